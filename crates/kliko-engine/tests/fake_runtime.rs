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
