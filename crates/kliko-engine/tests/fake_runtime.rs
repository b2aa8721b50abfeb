//! The engine's run lifecycle against the scripted fake runtime: no Docker, so these run
//! anywhere and quickly. The same paths are exercised against real Docker by kliko-cli's
//! tests; these pin the engine's own logic (hit/miss, one run for identical runs in flight,
//! a leader's failure told to its waiters, timeouts, cancellation, orphan sweeps).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kliko_engine::{
    Cache, Engine, EngineError, Input, NoObserver, RunReport, RunRequest, Status, KEY_LABEL, STORE_LABEL,
};
use kliko_runtime::fake::{FakeContainer, FakeExit, FakeRuntime};
use kliko_runtime::{ContainerRuntime, RuntimeError};
use kliko_spec::ParamLayer;
use kliko_store::lease::{Attempt, Holder, LeaseBackend, Release};
use kliko_store::Store;
use tokio_util::sync::CancellationToken;

const SPLIT_YML: &[u8] = b"schema_version: 3
io: split
sections:
  - name: main
    description: knobs
    fields:
      - {name: tag, type: str, initial: x}
";

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    store: Arc<Store>,
    fake: Arc<FakeRuntime>,
    engine: Arc<Engine>,
    input: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let store = Arc::new(Store::open(&root.join("store")).unwrap());
    let fake = Arc::new(FakeRuntime::new());
    let engine = Arc::new(Engine::with_runtime(store.clone(), fake.clone() as Arc<dyn ContainerRuntime>));
    let input = root.join("input");
    std::fs::create_dir_all(&input).unwrap();
    std::fs::write(input.join("data.txt"), "visibilities").unwrap();
    Setup { _dir: dir, root, store, fake, engine, input }
}

/// The container's parameters.json, as the fake container sees it.
fn params_json(c: &FakeContainer<'_>) -> String {
    std::fs::read_to_string(c.host("/parameters.json").expect("parameters.json mounted")).unwrap()
}

/// An image that copies its input's data.txt and its parameters to /output.
fn add_copy_image(s: &Setup, reference: &str, exit: impl Fn() -> FakeExit + Send + Sync + 'static) {
    s.fake.add_image(reference, &[("/kliko.yml", SPLIT_YML)], move |c| {
        let out = c.host("/output").expect("output mounted");
        let input = c.host("/input").expect("input mounted");
        std::fs::copy(input.join("data.txt"), out.join("data.txt")).unwrap();
        std::fs::write(out.join("params.json"), params_json(c)).unwrap();
        exit().stdout("working\n")
    });
}

impl Setup {
    fn request(&self, image: &str, out: &str) -> RunRequest {
        RunRequest::new(image, Input::Path(self.input.clone()), Some(self.root.join(out)))
    }

    async fn run(&self, req: RunRequest) -> Result<RunReport, EngineError> {
        self.engine.run(req, Arc::new(NoObserver), CancellationToken::new()).await
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_runs_once_and_an_identical_rerun_is_a_hit_without_a_container() {
    let s = setup();
    add_copy_image(&s, "tool:1", || FakeExit::code(0));
    let first = s.run(s.request("tool:1", "out1")).await.unwrap();
    assert_eq!((first.cache, first.status, first.exit_code), (Cache::Miss, Status::Succeeded, 0));
    assert!(first.recorded);
    assert_eq!(read(&s.root.join("out1/data.txt")), "visibilities");
    assert_eq!(s.fake.runs(), 1);

    let second = s.run(s.request("tool:1", "out2")).await.unwrap();
    assert_eq!((second.cache, second.status), (Cache::Hit, Status::Succeeded));
    assert_eq!(second.key, first.key);
    assert_eq!(second.output, first.output);
    assert_eq!(read(&s.root.join("out2/data.txt")), "visibilities");
    assert_eq!(s.fake.runs(), 1, "a hit starts no container");
    // The kliko.yml is read from the image once, then remembered per image ID.
    assert_eq!(s.fake.files_read(), 1);
    // Nothing is left behind in the runtime.
    assert!(s.fake.containers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_follows_parameters_input_and_image() {
    let s = setup();
    add_copy_image(&s, "tool:1", || FakeExit::code(0));
    let base = s.run(s.request("tool:1", "o1")).await.unwrap();

    let mut req = s.request("tool:1", "o2");
    req.params.push(ParamLayer::strings([("tag", "y")]));
    let other_param = s.run(req).await.unwrap();
    assert_eq!(other_param.cache, Cache::Miss);
    assert_ne!(other_param.key, base.key);
    assert!(read(&s.root.join("o2/params.json")).contains("\"y\""));

    // The parameter's default, given explicitly, is the same run.
    let mut req = s.request("tool:1", "o3");
    req.params.push(ParamLayer::strings([("tag", "x")]));
    assert_eq!(s.run(req).await.unwrap().cache, Cache::Hit);

    std::fs::write(s.input.join("data.txt"), "other visibilities").unwrap();
    let other_input = s.run(s.request("tool:1", "o4")).await.unwrap();
    assert_eq!(other_input.cache, Cache::Miss);
    assert_eq!(read(&s.root.join("o4/data.txt")), "other visibilities");

    // Another image (another content ID) under the same tag: a miss.
    s.fake.add_image("tool:1", &[("/kliko.yml", SPLIT_YML), ("/changed", b"1")], |_| FakeExit::code(0));
    assert_eq!(s.run(s.request("tool:1", "o5")).await.unwrap().cache, Cache::Miss);
    assert_eq!(s.fake.runs(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn why_a_run_missed_names_the_nearest_earlier_run_and_what_differed() {
    let s = setup();
    add_copy_image(&s, "tool:1", || FakeExit::code(0));
    add_copy_image(&s, "other:1", || FakeExit::code(0));
    let result = |key| {
        let db = s.store.db().unwrap();
        s.store.lookup(&db, &key).unwrap().expect("recorded")
    };
    let first = s.run(s.request("tool:1", "o1")).await.unwrap();
    // Nothing of this image ran before the first run.
    assert_eq!(kliko_engine::explain::why_missed(&s.store, &result(first.key)).unwrap(), None);
    // Another image's runs are never the "nearest".
    s.run(s.request("other:1", "o0")).await.unwrap();

    let mut req = s.request("tool:1", "o2");
    req.params.push(ParamLayer::strings([("tag", "y")]));
    let second = s.run(req).await.unwrap();
    let (nearest, diffs) = kliko_engine::explain::why_missed(&s.store, &result(second.key)).unwrap().unwrap();
    assert_eq!(nearest, first.key);
    assert_eq!(diffs, vec!["parameters.tag: \"x\" → \"y\"".to_string()]);
    // A run is only explained by runs recorded before it: the first still has none, though
    // a later run of its image is stored now.
    assert_eq!(kliko_engine::explain::why_missed(&s.store, &result(first.key)).unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_runs_in_flight_execute_once() {
    let s = setup();
    add_copy_image(&s, "slow:1", || FakeExit::code(0).taking(Duration::from_millis(600)));
    let (a, b) = tokio::join!(s.run(s.request("slow:1", "a")), s.run(s.request("slow:1", "b")));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(s.fake.runs(), 1, "two identical runs in flight start one container");
    let mut caches = [a.cache, b.cache];
    caches.sort_by_key(|c| *c == Cache::Hit);
    assert_eq!(caches, [Cache::Miss, Cache::Hit]);
    let waiter = if a.cache == Cache::Hit { &a } else { &b };
    let holder = waiter.waited_on.as_ref().expect("the hit waited on the leader");
    assert_eq!(holder.pid, std::process::id());
    assert_eq!(read(&s.root.join("a/data.txt")), read(&s.root.join("b/data.txt")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaders_failure_is_told_to_its_waiter_and_retried_only_when_asked() {
    let s = setup();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    s.fake.add_image("flaky:1", &[("/kliko.yml", SPLIT_YML)], move |_| {
        counted.fetch_add(1, Ordering::SeqCst);
        FakeExit::code(3).stderr("bad calibration table\n").taking(Duration::from_millis(600))
    });

    let (a, b) = tokio::join!(s.run(s.request("flaky:1", "a")), s.run(s.request("flaky:1", "b")));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(s.fake.runs(), 1);
    let mut statuses = [a.status, b.status];
    statuses.sort_by_key(|st| *st == Status::LeaderFailed);
    assert_eq!(statuses, [Status::Failed, Status::LeaderFailed]);
    let (leader, waiter) = if a.status == Status::Failed { (&a, &b) } else { (&b, &a) };
    assert_eq!(leader.exit_code, 3);
    assert!(!leader.recorded, "a failure is never recorded as a result");
    assert!(leader.log_tail.iter().any(|l| l.contains("bad calibration table")), "{:?}", leader.log_tail);
    assert_ne!(waiter.exit_code, 0);
    assert!(waiter.waited_on.is_some());

    // A failure is not cached: the next run runs again.
    let again = s.run(s.request("flaky:1", "c")).await.unwrap();
    assert_eq!((again.cache, again.status), (Cache::Miss, Status::Failed));
    assert_eq!(s.fake.runs(), 2);

    // With retry_failed, a waiter whose leader failed runs it itself, once.
    let mut retry = s.request("flaky:1", "e");
    retry.retry_failed = true;
    let (d, e) = tokio::join!(s.run(s.request("flaky:1", "d")), async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        s.run(retry).await
    });
    assert_eq!(d.unwrap().status, Status::Failed);
    let e = e.unwrap();
    assert_eq!(e.status, Status::Failed, "the waiter ran it again itself");
    assert_eq!(e.exit_code, 3);
    assert_eq!(s.fake.runs(), 4);
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_stops_the_container_and_records_nothing() {
    let s = setup();
    add_copy_image(&s, "hang:1", || FakeExit::code(0).taking(Duration::from_secs(30)));
    let mut req = s.request("hang:1", "out");
    req.timeout = Some(Duration::from_millis(200));
    let started = std::time::Instant::now();
    let report = s.run(req.clone()).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!((report.status, report.exit_code, report.recorded), (Status::TimedOut, 124, false));
    // Not cached: the same request runs again.
    let again = s.run(req).await.unwrap();
    assert_eq!((again.cache, again.status), (Cache::Miss, Status::TimedOut));
    assert_eq!(s.fake.runs(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_run_records_nothing_and_frees_its_lease() {
    let s = setup();
    add_copy_image(&s, "long:1", || FakeExit::code(0).taking(Duration::from_secs(30)));
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        trigger.cancel();
    });
    let report = s.engine.run(s.request("long:1", "out"), Arc::new(NoObserver), cancel).await.unwrap();
    assert_eq!((report.status, report.exit_code, report.recorded), (Status::Cancelled, 130, false));
    assert!(s.store.leases().is_free(&report.key), "a cancelled leader lets go of its lease");
    assert!(s.fake.containers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_removes_containers_whose_run_is_over_and_keeps_running_ones() {
    let s = setup();
    let store_root = s.store.root().to_str().unwrap().to_string();
    let labels = |key: &kliko_core::Digest| {
        BTreeMap::from([(STORE_LABEL.to_string(), store_root.clone()), (KEY_LABEL.to_string(), key.to_hex())])
    };
    let dead_key = kliko_core::Digest::of_bytes(b"a run whose process was killed");
    let live_key = kliko_core::Digest::of_bytes(b"a run still going");
    let dead = s.fake.leave_container(labels(&dead_key));
    let live = s.fake.leave_container(labels(&live_key));
    // Another store's container is none of this store's business.
    let foreign = s.fake.leave_container(BTreeMap::from([
        (STORE_LABEL.to_string(), "/elsewhere".to_string()),
        (KEY_LABEL.to_string(), dead_key.to_hex()),
    ]));

    let leases = s.store.leases();
    let me = Holder::this_process("2026-01-01T00:00:00Z".into(), None);
    let Attempt::Leader(held) = leases.try_acquire(&live_key, &me).unwrap() else { panic!("lease is free") };

    let removed = s.engine.remove_dead_containers().await.unwrap();
    assert_eq!(removed, vec![dead.clone()]);
    let mut left = s.fake.containers();
    left.sort();
    let mut expected = vec![live.clone(), foreign];
    expected.sort();
    assert_eq!(left, expected);

    held.release(Release::Abandoned);
    assert_eq!(s.engine.remove_dead_containers().await.unwrap(), vec![live]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_and_image_failures_are_errors_before_any_container() {
    let s = setup();
    match s.run(s.request("absent:1", "out")).await {
        Err(EngineError::Runtime(RuntimeError::ImageNotFound { reference })) => assert_eq!(reference, "absent:1"),
        other => panic!("expected ImageNotFound, got {other:?}"),
    }
    s.fake.add_image("broken:1", &[("/kliko.yml", b"schema_version: 3\nio: sideways\n")], |_| FakeExit::code(0));
    assert!(matches!(s.run(s.request("broken:1", "out")).await, Err(EngineError::Spec(_))));
    s.fake.add_image("plain:1", &[], |_| FakeExit::code(0));
    assert!(matches!(
        s.run(s.request("plain:1", "out")).await,
        Err(EngineError::Runtime(RuntimeError::FileNotInImage { .. }))
    ));
    assert_eq!(s.fake.runs(), 0);
    assert!(!s.root.join("out").exists(), "a failed run creates no output folder");

    let down = Engine::with_runtime(s.store.clone(), Arc::new(FakeRuntime::unreachable()));
    let err = down.run(s.request("tool:1", "out"), Arc::new(NoObserver), CancellationToken::new()).await.unwrap_err();
    assert!(matches!(err, EngineError::Runtime(RuntimeError::Unreachable { .. })), "{err:?}");
    assert!(err.to_string().contains("cannot reach"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_empty_output_folder_is_never_overwritten_unless_asked() {
    let s = setup();
    add_copy_image(&s, "tool:1", || FakeExit::code(0));
    let out = s.root.join("mine");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("thesis.tex"), "precious").unwrap();
    let err = s.run(s.request("tool:1", "mine")).await.unwrap_err();
    assert!(matches!(err, EngineError::OutputNotEmpty { .. }), "{err:?}");
    assert_eq!(read(&out.join("thesis.tex")), "precious");
    assert_eq!(s.fake.runs(), 0);

    let mut req = s.request("tool:1", "mine");
    req.overwrite = true;
    assert_eq!(s.run(req).await.unwrap().status, Status::Succeeded);
    assert_eq!(read(&out.join("data.txt")), "visibilities");
}

// ---------------------------------------------------------------- the shared tier

/// Two machines (two stores, two runtimes) sharing one tier at `remote`.
fn two_machines(remote: &str) -> (Setup, Setup) {
    two_machines_with(remote, &[])
}

fn two_machines_with(remote: &str, options: &[(&str, &str)]) -> (Setup, Setup) {
    let mut m = machines(remote, options, 2);
    let b = m.pop().unwrap();
    (m.pop().unwrap(), b)
}

/// `n` machines (stores and runtimes) sharing one tier at `remote`.
fn machines(remote: &str, options: &[(&str, &str)], n: usize) -> Vec<Setup> {
    (0..n).map(|_| machine_on(remote, options, |r| r)).collect()
}

/// One machine on the tier at `remote`, its view of the tier configured by `configure`.
fn machine_on(
    remote: &str,
    options: &[(&str, &str)],
    configure: impl FnOnce(kliko_remote::Remote) -> kliko_remote::Remote,
) -> Setup {
    machine_with(remote, options, configure, FakeRuntime::new())
}

/// [`machine_on`] with this runtime.
fn machine_with(
    remote: &str,
    options: &[(&str, &str)],
    configure: impl FnOnce(kliko_remote::Remote) -> kliko_remote::Remote,
    fake: FakeRuntime,
) -> Setup {
    let mut s = setup();
    s.fake = Arc::new(fake);
    let tier = Arc::new(configure(kliko_remote::Remote::open_with(remote, false, options).unwrap()));
    let engine = Engine::with_runtime(s.store.clone(), s.fake.clone() as Arc<dyn ContainerRuntime>);
    s.engine = Arc::new(engine.with_remote(tier));
    // The same image on every machine (the same content ID).
    add_copy_image(&s, "tool:1", || FakeExit::code(0));
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_that_reads_the_image_itself_asks_neither_the_tier_nor_a_container_for_kliko_yml() {
    let tier = tempfile::tempdir().unwrap();
    let remote = tier.path().to_str().unwrap();
    let a = machine_on(remote, &[], |r| r);
    let made = a.run(a.request("tool:1", "out")).await.unwrap();
    assert_eq!(made.cache, Cache::Miss);
    assert_eq!(a.fake.files_read(), 1, "the first machine read kliko.yml through a container");
    // A machine whose runtime reads the image's files without a container (Docker's layer
    // folders): that comes before the tier's copy, which it then never needs to trust.
    let c = machine_with(remote, &[], |r| r, FakeRuntime::new().with_cheap_reads());
    let reused = c.run(c.request("tool:1", "out")).await.unwrap();
    assert_eq!((reused.cache, reused.hit_from), (Cache::Hit, Some(kliko_engine::Tier::Remote)));
    assert_eq!((c.fake.cheap_reads(), c.fake.files_read(), c.fake.runs()), (1, 0, 0));
    // Remembered in the store: the next run reads nothing at all.
    let again = c.run(c.request("tool:1", "out2")).await.unwrap();
    assert_eq!(again.cache, Cache::Hit);
    assert_eq!((c.fake.cheap_reads(), c.fake.files_read()), (1, 0));
}

async fn a_result_made_on_one_machine_is_a_hit_on_another(remote: &str) {
    let (a, b) = two_machines(remote);
    let made = a.run(a.request("tool:1", "out")).await.unwrap();
    assert_eq!((made.cache, made.status), (Cache::Miss, Status::Succeeded));
    let published = made.published.clone().expect("published");
    assert!(published.uploaded >= 4 && !published.raced, "{published:?}");

    let reused = b.run(b.request("tool:1", "out")).await.unwrap();
    assert_eq!(
        (reused.cache, reused.hit_from),
        (Cache::Hit, Some(kliko_engine::Tier::Remote)),
        "{:?}",
        reused.warnings
    );
    assert_eq!(reused.key, made.key);
    assert_eq!(b.fake.runs(), 0, "no container on the second machine");
    assert_eq!(b.fake.files_read(), 0, "not even one to read kliko.yml: the first machine left it on the tier");
    assert_eq!(read(&b.root.join("out/data.txt")), "visibilities");
    // Backfilled: the next hit there is local, and its logs came along.
    let again = b.run(b.request("tool:1", "out2")).await.unwrap();
    assert_eq!((again.cache, again.hit_from), (Cache::Hit, Some(kliko_engine::Tier::Local)));
    let result = again.result.unwrap();
    assert_eq!(b.store.get_bytes(kliko_store::ObjectKind::Blob, &result.stdout).unwrap(), b"working\n");

    // A file big enough to go up in parts comes back whole.
    let big = |c: &FakeContainer<'_>| {
        let bytes: Vec<u8> = (0..20u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        std::fs::write(c.host("/output").unwrap().join("big.bin"), bytes).unwrap();
        FakeExit::code(0)
    };
    a.fake.add_image("big:1", &[("/kliko.yml", SPLIT_YML)], big);
    b.fake.add_image("big:1", &[("/kliko.yml", SPLIT_YML)], big);
    let made_big = a.run(a.request("big:1", "big")).await.unwrap();
    assert!(made_big.published.as_ref().unwrap().bytes > kliko_remote::MULTIPART_ABOVE);
    let got_big = b.run(b.request("big:1", "big")).await.unwrap();
    assert_eq!(got_big.hit_from, Some(kliko_engine::Tier::Remote));
    assert_eq!(std::fs::read(b.root.join("big/big.bin")).unwrap(), std::fs::read(a.root.join("big/big.bin")).unwrap());

    // Publishing again uploads nothing; a second record for the key keeps the first.
    let tier = kliko_remote::Remote::open(remote, false).unwrap();
    let p = tier.publish(&a.store, made.result.as_ref().unwrap()).await.unwrap();
    assert_eq!((p.uploaded, p.raced), (0, true), "{p:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_folder_tier_serves_a_second_machine() {
    let tier = tempfile::tempdir().unwrap();
    a_result_made_on_one_machine_is_a_hit_on_another(tier.path().to_str().unwrap()).await;
}

/// Against a real S3 server: `scripts/test.sh` starts SeaweedFS on 127.0.0.1 (inside a
/// network namespace) and sets `KLIKO_TEST_S3` to a bucket URL; without it, nothing to test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_tier_serves_a_second_machine() {
    let Ok(bucket) = std::env::var("KLIKO_TEST_S3") else {
        eprintln!("KLIKO_TEST_S3 is not set: no S3 server to test against");
        return;
    };
    let prefix = format!(
        "{}/{}",
        bucket.trim_end_matches('/'),
        kliko_core::Digest::of_bytes(&std::process::id().to_le_bytes()).short(12)
    );
    a_result_made_on_one_machine_is_a_hit_on_another(&prefix).await;
    runs_started_on_two_machines_at_once(&format!("{prefix}/race")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_shared_result_is_a_miss_never_a_partial_output() {
    let tier = tempfile::tempdir().unwrap();
    let (a, b) = two_machines(tier.path().to_str().unwrap());
    let made = a.run(a.request("tool:1", "out")).await.unwrap();
    // Corrupt the one data.txt blob on the tier.
    let data = kliko_core::Digest::of_bytes(b"visibilities").to_hex();
    let blob = tier.path().join("kliko-remote-v1/blobs-v1").join(&data[..2]).join(&data[2..]);
    std::fs::write(&blob, "tampered").unwrap();
    let run = b.run(b.request("tool:1", "out")).await.unwrap();
    assert_eq!((run.cache, run.status), (Cache::Miss, Status::Succeeded), "the run happens here");
    assert_eq!(run.key, made.key);
    assert_eq!(b.fake.runs(), 1);
    assert_eq!(read(&b.root.join("out/data.txt")), "visibilities");

    // A missing record object (deleted blob) is a miss too.
    std::fs::remove_file(&blob).unwrap();
    let (_, c) = two_machines(tier.path().to_str().unwrap());
    let run = c.run(c.request("tool:1", "out")).await.unwrap();
    assert_eq!(run.cache, Cache::Miss);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_tier_is_a_warning_and_the_run_goes_on() {
    // Nothing listens on port 9 of loopback.
    let options = [
        ("aws_access_key_id", "x"),
        ("aws_secret_access_key", "x"),
        ("aws_region", "us-east-1"),
        ("aws_allow_http", "true"),
        ("aws_endpoint", "http://127.0.0.1:9"),
    ];
    let (a, _) = two_machines_with("s3://nowhere/kliko", &options);
    let report = a.run(a.request("tool:1", "out")).await.unwrap();
    assert_eq!((report.cache, report.status, report.recorded), (Cache::Miss, Status::Succeeded, true));
    assert!(report.published.is_none());
    // One warning, from the first request; the tier is not asked again (no publish, no leases).
    assert!(
        report.warnings.iter().any(|w| w.contains("could not list its results") && w.contains("going on without it")),
        "{:?}",
        report.warnings
    );
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    // The local store has it.
    assert_eq!(a.run(a.request("tool:1", "out2")).await.unwrap().hit_from, Some(kliko_engine::Tier::Local));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_runs_started_on_four_machines_at_once_execute_once() {
    let tier = tempfile::tempdir().unwrap();
    let remote = tier.path().to_str().unwrap();
    let key = runs_started_on_two_machines_at_once(remote).await;
    // Released: no lease is left on the tier.
    let leases = tier.path().join("kliko-remote-v1/leases").join(key.to_hex());
    assert!(std::fs::read_dir(&leases).map(|d| d.count() == 0).unwrap_or(true));
}

/// Four machines start the same run at once: one container runs, the other three wait on it
/// and get its result from the tier.
async fn runs_started_on_two_machines_at_once(remote: &str) -> kliko_core::Digest {
    let m = machines(remote, &[], 4);
    for s in &m {
        add_copy_image(s, "slow:1", || FakeExit::code(0).taking(Duration::from_millis(1500)));
    }
    let reports: Vec<RunReport> = futures_util::future::join_all(m.iter().map(|s| s.run(s.request("slow:1", "out"))))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(m.iter().map(|s| s.fake.runs()).sum::<usize>(), 1, "one container across four machines");
    assert_eq!(reports.iter().filter(|r| r.cache == Cache::Miss).count(), 1);
    for waiter in reports.iter().filter(|r| r.cache == Cache::Hit) {
        assert_eq!(waiter.hit_from, Some(kliko_engine::Tier::Remote));
        assert!(waiter.waited_on.is_some(), "the other machines waited on the leader");
    }
    for s in &m {
        assert_eq!(read(&s.root.join("out/data.txt")), "visibilities");
    }
    reports[0].key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_whose_holder_died_on_another_machine_is_taken_over() {
    let tier = tempfile::tempdir().unwrap();
    let (_, b) = two_machines(tier.path().to_str().unwrap());
    let key = b.engine.prepare(&b.request("tool:1", "out")).await.unwrap().key;
    // A holder on another machine that stopped renewing (it was killed, its node died).
    let dir = tier.path().join("kliko-remote-v1/leases").join(key.to_hex());
    std::fs::create_dir_all(&dir).unwrap();
    let dead = r#"{"holder":{"pid":4242,"host":"node-that-died","started_at":"2026-01-01T00:00:00Z"},"id":"dead","seq":7,"ttl_s":1}"#;
    std::fs::write(dir.join(format!("{:020}.json", 1)), dead).unwrap();

    let started = std::time::Instant::now();
    let report = b.run(b.request("tool:1", "out")).await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(1), "it waited for the lease to expire first");
    assert_eq!((report.cache, report.status), (Cache::Miss, Status::Succeeded));
    assert_eq!(report.waited_on.as_ref().map(|h| h.host.as_str()), Some("node-that-died"));
    assert_eq!(b.fake.runs(), 1);
    // The takeover was a new generation; released, it took the dead one with it, so the next
    // machine to run this key does not wait out its expiry again.
    assert_eq!(std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0), 0);
}

// ---------------------------------------------------------------- trust

fn signing_key(dir: &Path, name: &str) -> kliko_remote::trust::SigningKey {
    kliko_remote::trust::SigningKey::create(&dir.join(name)).unwrap()
}

fn trusting(keys: &[&kliko_remote::trust::SigningKey]) -> kliko_remote::trust::Trust {
    kliko_remote::trust::Trust::only(keys.iter().map(|k| k.public()).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_not_signed_by_a_trusted_key_is_never_used() {
    let (tier, keys) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let remote = tier.path().to_str().unwrap();
    let (alice, mallory) = (signing_key(keys.path(), "alice"), signing_key(keys.path(), "mallory"));
    let alice_pub = alice.public();
    // Mallory publishes first: a record of the key, signed by Mallory.
    let m = machine_on(remote, &[], |r| r.with_signer(Some(mallory)));
    let planted = m.run(m.request("tool:1", "out")).await.unwrap();
    assert!(planted.published.as_ref().unwrap().signed_by.is_some());

    // Bob trusts only Alice: Mallory's record is not used, and --explain says why.
    let bob_key = signing_key(keys.path(), "bob");
    let bob_trust = trusting(&[&alice]);
    let bob = machine_on(remote, &[], |r| r.with_trust(bob_trust));
    let why = bob.engine.explain(&bob.request("tool:1", "out")).await.unwrap();
    assert_eq!(bob.fake.files_read(), 1, "Mallory's copy of kliko.yml is not trusted either: read from the image");
    let said = why.remote.expect("the tier is explained");
    assert!(said.contains("ignored") && said.contains("not a trusted key"), "{said}");
    let run = bob.run(bob.request("tool:1", "out")).await.unwrap();
    assert_eq!((run.cache, run.status), (Cache::Miss, Status::Succeeded));
    assert_eq!(bob.fake.runs(), 1, "the run happened on Bob's machine");
    assert!(run.warnings.iter().any(|w| w.contains("not a trusted key")), "{:?}", run.warnings);
    drop(bob_key);

    // Alice (trusting herself) replaces the record she does not trust with her own...
    let alice_trust = trusting(&[&alice]);
    let a = machine_on(remote, &[], |r| r.with_trust(alice_trust).with_signer(Some(alice)));
    let made = a.run(a.request("tool:1", "out")).await.unwrap();
    let published = made.published.clone().unwrap();
    assert!(published.replaced && !published.raced, "{published:?}");
    assert_eq!(published.signed_by, Some(alice_pub.to_string()));
    // ...which a reader that trusts Alice uses.
    let carol_trust = kliko_remote::trust::Trust::only(vec![alice_pub]);
    let carol = machine_on(remote, &[], |r| r.with_trust(carol_trust));
    let said = carol.engine.explain(&carol.request("tool:1", "out")).await.unwrap().remote.unwrap();
    assert!(said.contains("trusted") && said.contains(&alice_pub.to_string()), "{said}");
    let hit = carol.run(carol.request("tool:1", "out")).await.unwrap();
    assert_eq!((hit.cache, hit.hit_from), (Cache::Hit, Some(kliko_engine::Tier::Remote)), "{:?}", hit.warnings);
    assert_eq!(carol.fake.runs(), 0);

    // An unsigned record is not used by a reader with trusted keys.
    let record = tier.path().join("kliko-remote-v1/ac").join(format!("{}.json", made.key.to_hex()));
    let text = read(&record);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    std::fs::write(&record, serde_json::json!({ "result": v["result"] }).to_string()).unwrap();
    let dave_trust = kliko_remote::trust::Trust::only(vec![alice_pub]);
    let dave = machine_on(remote, &[], |r| r.with_trust(dave_trust));
    let said = dave.engine.explain(&dave.request("tool:1", "out")).await.unwrap().remote.unwrap();
    assert!(said.contains("not signed"), "{said}");
    // A reader with no trusted keys uses it.
    let erin = machine_on(remote, &[], |r| r);
    assert_eq!(erin.run(erin.request("tool:1", "out")).await.unwrap().hit_from, Some(kliko_engine::Tier::Remote));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_whose_signed_contents_were_edited_is_never_used() {
    let (tier, keys) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let remote = tier.path().to_str().unwrap();
    let alice = signing_key(keys.path(), "alice");
    let a = machine_on(remote, &[], |r| r.with_signer(Some(alice)));
    let made = a.run(a.request("tool:1", "out")).await.unwrap();
    // Point the signed record at other output: the signature no longer matches.
    let record = tier.path().join("kliko-remote-v1/ac").join(format!("{}.json", made.key.to_hex()));
    let text = read(&record);
    let out = made.result.as_ref().unwrap().output.to_hex();
    let other = kliko_core::Digest::of_bytes(b"something else").to_hex();
    std::fs::write(&record, text.replace(&out, &other)).unwrap();
    // Even a reader with no trusted keys refuses a bad signature.
    let b = machine_on(remote, &[], |r| r);
    let run = b.run(b.request("tool:1", "out")).await.unwrap();
    assert_eq!(run.cache, Cache::Miss);
    assert!(run.warnings.iter().any(|w| w.contains("does not match")), "{:?}", run.warnings);
    assert_eq!(read(&b.root.join("out/data.txt")), "visibilities");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_folder_this_user_may_not_write_is_an_error_before_any_container() {
    let tier = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tier.path(), std::os::unix::fs::PermissionsExt::from_mode(0o555)).unwrap();
    // Root may write anyway (unless the filesystem is read-only): nothing to test as root.
    if std::fs::write(tier.path().join("probe"), "").is_ok() {
        eprintln!("running as root: the folder is writable anyway");
        return;
    }
    let a = machine_on(tier.path().to_str().unwrap(), &[], |r| r);
    let e = a.run(a.request("tool:1", "out")).await.unwrap_err().to_string();
    assert!(e.contains("may not read and write the shared folder"), "{e}");
    assert_eq!(a.fake.runs(), 0);
}

/// Against the real S3 server (`KLIKO_TEST_S3`): a bucket that does not exist and refused
/// credentials are errors before anything runs, each naming what to fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bucket_or_refused_credentials_is_an_error_before_any_container() {
    if std::env::var("KLIKO_TEST_S3").is_err() {
        eprintln!("KLIKO_TEST_S3 is not set: no S3 server to test against");
        return;
    }
    let a = machine_on("s3://no-such-bucket-for-kliko/x", &[], |r| r);
    let e = a.run(a.request("tool:1", "out")).await.unwrap_err().to_string();
    assert!(e.contains("the bucket does not exist"), "{e}");
    let b = machine_on(&std::env::var("KLIKO_TEST_S3").unwrap(), &[("aws_secret_access_key", "wrong")], |r| r);
    let e = b.run(b.request("tool:1", "out")).await.unwrap_err().to_string();
    assert!(e.contains("refused the credentials"), "{e}");
    assert_eq!(a.fake.runs() + b.fake.runs(), 0);
}

/// Keeps the log bytes it is shown.
#[derive(Default)]
struct LogsSeen(std::sync::Mutex<Vec<u8>>);

impl kliko_engine::Observer for LogsSeen {
    fn log(&self, _stream: kliko_engine::Stream, bytes: &[u8]) {
        self.0.lock().unwrap().extend_from_slice(bytes);
    }
}

/// `a`'s run of `image` into `out`, started in the background.
fn lead_in_background(a: Setup, image: &'static str) -> (Arc<Setup>, tokio::task::JoinHandle<kliko_engine::RunReport>) {
    let a = Arc::new(a);
    let leader = {
        let a = a.clone();
        tokio::spawn(async move { a.run(a.request(image, "out")).await.unwrap() })
    };
    (a, leader)
}

/// Once some machine leads a run on the folder tier at `tier` (or after 5 s).
async fn leading_on(tier: &Path) {
    let leases = tier.join("kliko-remote-v1/leases");
    for _ in 0..100 {
        if std::fs::read_dir(&leases).is_ok_and(|mut d| d.next().is_some()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_on_another_machine_sees_the_leaders_logs_as_they_grow() {
    let tier = tempfile::tempdir().unwrap();
    let (a, b) = two_machines(tier.path().to_str().unwrap());
    let slow = |_: &FakeContainer<'_>| FakeExit::code(0).stdout("calibrating 3C286\n").taking(Duration::from_secs(3));
    a.fake.add_image("slow:1", &[("/kliko.yml", SPLIT_YML)], slow);
    b.fake.add_image("slow:1", &[("/kliko.yml", SPLIT_YML)], slow);
    let (_a, leader) = lead_in_background(a, "slow:1");
    leading_on(tier.path()).await;
    let seen = Arc::new(LogsSeen::default());
    let waiting = b.engine.run(b.request("slow:1", "out"), seen.clone(), CancellationToken::new());
    let (waited, led) = tokio::join!(waiting, leader);
    let (waited, led) = (waited.unwrap(), led.unwrap());
    assert_eq!(led.cache, Cache::Miss);
    assert_eq!((waited.cache, waited.hit_from), (Cache::Hit, Some(kliko_engine::Tier::Remote)));
    assert!(waited.waited_on.is_some(), "B waited on A");
    assert_eq!(b.fake.runs(), 0);
    let shown = String::from_utf8(seen.0.lock().unwrap().clone()).unwrap();
    assert_eq!(shown, "calibrating 3C286\n", "A's log lines, once, while B waited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_follows_a_run_another_machine_leads_instead_of_starting_one() {
    let tier = tempfile::tempdir().unwrap();
    let (a, b) = two_machines(tier.path().to_str().unwrap());
    let slow = |_: &FakeContainer<'_>| FakeExit::code(0).stdout("imaging\n").taking(Duration::from_secs(2));
    a.fake.add_image("slow:1", &[("/kliko.yml", SPLIT_YML)], slow);
    b.fake.add_image("slow:1", &[("/kliko.yml", SPLIT_YML)], slow);
    let obs: Arc<dyn kliko_engine::Observer> = Arc::new(LogsSeen::default());
    let cancel = CancellationToken::new();
    // Nobody leads it: a dispatcher would start it.
    let req = b.request("slow:1", "out");
    let (prep, hit) = b.engine.lookup(&req, None, &obs).await.unwrap();
    assert!(hit.is_none());
    assert!(b.engine.follow_in_flight(&req, &prep, &obs, &cancel).await.unwrap().is_none());

    let (a, leader) = lead_in_background(a, "slow:1");
    leading_on(tier.path()).await;
    // A leads it: B follows A's run to its result and starts nothing.
    let followed = b.engine.follow_in_flight(&req, &prep, &obs, &cancel).await.unwrap();
    let led = leader.await.unwrap();
    match followed {
        Some(kliko_engine::Followed::Recorded(r)) => {
            assert_eq!((r.key, r.status), (led.key, Status::Succeeded));
            assert_eq!(r.output, led.output);
        }
        other => panic!("not followed to its result: {other:?}"),
    }
    assert_eq!((a.fake.runs(), b.fake.runs()), (1, 0));
    // Over and recorded: nobody leads it any more, and it is a hit.
    assert!(b.engine.follow_in_flight(&req, &prep, &obs, &cancel).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tier_that_ignores_conditional_writes_gets_no_leases_and_one_warning() {
    let tier = tempfile::tempdir().unwrap();
    let remote = tier.path().to_str().unwrap();
    let garage = |r: kliko_remote::Remote| r.map_object_store(kliko_remote::fake::IgnoresConditionalWrites::wrap);
    let (a, b) = (machine_on(remote, &[], garage), machine_on(remote, &[], garage));
    let (ra, rb) = tokio::join!(a.run(a.request("tool:1", "out")), b.run(b.request("tool:1", "out")));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    for r in [&ra, &rb] {
        assert_eq!(r.status, Status::Succeeded);
        let said: Vec<_> = r.warnings.iter().filter(|w| w.contains("does not honour create-if-absent")).collect();
        assert!(said.len() <= 1, "{:?}", r.warnings);
    }
    assert!(
        [&ra, &rb].iter().any(|r| r.warnings.iter().any(|w| w.contains("does not honour create-if-absent"))),
        "{:?} {:?}",
        ra.warnings,
        rb.warnings
    );
    // Without leases both may run; either way the results are right and the tier has one record.
    assert!((1..=2).contains(&(a.fake.runs() + b.fake.runs())));
    assert_eq!(read(&a.root.join("out/data.txt")), "visibilities");
    assert_eq!(read(&b.root.join("out/data.txt")), "visibilities");
    assert_eq!(std::fs::read_dir(tier.path().join("kliko-remote-v1/ac")).unwrap().count(), 1);
    assert_eq!(ra.key, rb.key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_published_in_the_background_is_a_hit_elsewhere_once_the_upload_ends() {
    let tier = tempfile::tempdir().unwrap();
    let remote = tier.path().to_str().unwrap();
    let mut a = machine_on(remote, &[], |r| r);
    let engine = Arc::try_unwrap(std::mem::replace(&mut a.engine, Arc::new(Engine::new(a.store.clone()))))
        .ok()
        .expect("one owner");
    a.engine = Arc::new(engine.with_remote_async(true));
    let made = a.run(a.request("tool:1", "out")).await.unwrap();
    assert_eq!((made.cache, made.status), (Cache::Miss, Status::Succeeded));
    assert!(made.publishing && made.published.is_none(), "{made:?}");
    assert_eq!(read(&a.root.join("out/data.txt")), "visibilities", "the output is in place at once");
    let done = a.engine.finish_background().await;
    assert_eq!(done.len(), 1);
    let p = done[0].outcome.as_ref().expect("published");
    assert!(p.uploaded >= 4, "{p:?}");
    assert!(a.engine.finish_background().await.is_empty(), "each is reported once");
    // The lease was let go after the upload.
    let lease = tier.path().join("kliko-remote-v1/leases").join(made.key.to_hex());
    assert_eq!(std::fs::read_dir(&lease).map(|d| d.count()).unwrap_or(0), 0);
    let b = machine_on(remote, &[], |r| r);
    let hit = b.run(b.request("tool:1", "out")).await.unwrap();
    assert_eq!((hit.cache, hit.hit_from), (Cache::Hit, Some(kliko_engine::Tier::Remote)));
}
