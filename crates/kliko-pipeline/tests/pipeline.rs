//! Pipelines against the real Docker daemon, through the library: parallel steps (measured
//! from the stored container start and finish times), failures with and without keep-going,
//! and validation errors that name the step and line. Images are built FROM scratch with
//! the testkit and removed when the test ends.

use std::path::Path;
use std::sync::Arc;

use kliko_engine::Engine;
use kliko_pipeline::{check, run, InProcess, NoReporter, Options, Pipeline, PipelineError, PipelineReport, StepState};
use kliko_testkit::{ImageBuilder, TestImage};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

const TOOL_YML: &str = "schema_version: 3
io: split
sections:
  - name: main
    description: test knobs
    fields:
      - {name: tag, type: str, initial: x}
      - {name: sleep, type: int, initial: 0}
      - {name: fail, type: bool, initial: false}
";

/// Lists its input with contents, writes its tag; sleeps or fails when told.
const TOOL_SCRIPT: &str = r#"set -eu
tag=$(sed -n 's/^ *"tag": *"\(.*\)",\{0,1\} *$/\1/p' /parameters.json)
sl=$(sed -n 's/^ *"sleep": *\([0-9]*\).*/\1/p' /parameters.json)
if grep -q '"fail": *true' /parameters.json; then echo "failing on purpose" >&2; exit 3; fi
if [ "${sl:-0}" -gt 0 ]; then sleep "$sl"; fi
cd /input
find . -type f | sort | while read -r f; do echo "$f: $(cat "$f")"; done > /output/listing.txt
echo "$tag" > /output/tag.txt
"#;

fn tool_image() -> TestImage {
    ImageBuilder::new("pipeline-tool").kliko_yml(TOOL_YML).kliko_script(TOOL_SCRIPT).build().expect("docker build")
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    engine: Arc<Engine>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let store = Arc::new(kliko_store::Store::open(&root.join("store")).unwrap());
    Fixture { _dir: dir, root, engine: Arc::new(Engine::new(store)) }
}

impl Fixture {
    fn write(&self, rel: &str, text: &str) {
        let p = self.root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn pipeline(&self, name: &str, text: &str) -> Pipeline {
        self.write(name, text);
        Pipeline::load(&self.root.join(name)).unwrap()
    }

    async fn run(&self, p: &Pipeline, jobs: usize, keep_going: bool) -> PipelineReport {
        let checked = check(&self.engine, p).await.unwrap_or_else(|e| panic!("{e}"));
        run(
            Arc::new(InProcess::new(self.engine.clone())),
            p,
            &checked,
            Options { jobs, keep_going },
            Arc::new(NoReporter),
            Default::default(),
        )
        .await
        .unwrap()
    }

    /// The stored container interval of a step's (only) run, in ms since the epoch.
    fn interval(&self, r: &PipelineReport, step: &str) -> (i128, i128) {
        let s = r.steps.iter().find(|s| s.name == step).unwrap();
        let key = s.runs[0].key.unwrap();
        let store = self.engine.store();
        let result = store.get_result(&store.db().unwrap(), &key).unwrap().expect("a stored result");
        let ms = |t: &str| OffsetDateTime::parse(t, &Rfc3339).unwrap().unix_timestamp_nanos() / 1_000_000;
        (ms(&result.started_at), ms(&result.finished_at))
    }
}

fn state(r: &PipelineReport, step: &str) -> StepState {
    r.steps.iter().find(|s| s.name == step).unwrap().state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_run_independent_steps_at_once() {
    let img = tool_image();
    let f = fixture();
    f.write("in/a.txt", "a");
    let text = |jobs: usize| {
        format!(
            "version: 1
steps:
  left:
    image: {0}
    input: in/
    params: {{tag: left-{jobs}, sleep: 2}}
  right:
    image: {0}
    input: in/
    params: {{tag: right-{jobs}, sleep: 2}}
  both:
    image: {0}
    input: [left, right]
",
            img.tag
        )
    };
    let overlap = |a: (i128, i128), b: (i128, i128)| a.0 < b.1 && b.0 < a.1;

    let p2 = f.pipeline("two.yml", &text(2));
    let r = f.run(&p2, 2, false).await;
    assert!(r.ok, "{r:#?}");
    let (l, rt) = (f.interval(&r, "left"), f.interval(&r, "right"));
    assert!(overlap(l, rt), "with --jobs 2 the independent containers ran at once: {l:?} {rt:?}");
    // The gathering step started after both.
    let b = f.interval(&r, "both");
    assert!(b.0 >= l.1 && b.0 >= rt.1, "{b:?} after {l:?} {rt:?}");

    let p1 = f.pipeline("one.yml", &text(1));
    let r = f.run(&p1, 1, false).await;
    assert!(r.ok, "{r:#?}");
    let (l, rt) = (f.interval(&r, "left"), f.interval(&r, "right"));
    assert!(!overlap(l, rt), "with --jobs 1 they ran one after the other: {l:?} {rt:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failure_stops_its_dependents_and_keep_going_finishes_the_rest() {
    let img = tool_image();
    let f = fixture();
    f.write("in/a.txt", "a");
    // `bad` fails at once; `slow` (independent) is still running then; `after_slow` can only
    // start once `slow` is done, i.e. after the failure.
    let text = |salt: &str| {
        format!(
            "version: 1
steps:
  bad:
    image: {0}
    input: in/
    params: {{fail: true, tag: bad-{salt}}}
  after_bad:
    image: {0}
    input: bad
  slow:
    image: {0}
    input: in/
    params: {{sleep: 3, tag: slow-{salt}}}
  after_slow:
    image: {0}
    input: slow
    params: {{tag: after-{salt}}}
",
            img.tag
        )
    };
    let p = f.pipeline("stop.yml", &text("stop"));
    let r = f.run(&p, 2, false).await;
    assert!(!r.ok);
    assert_eq!(state(&r, "bad"), StepState::Failed);
    assert_eq!(state(&r, "after_bad"), StepState::Skipped);
    assert_eq!(state(&r, "slow"), StepState::Done, "a running step finishes");
    assert_eq!(state(&r, "after_slow"), StepState::NotRun, "no new step starts after a failure");
    let bad = r.steps.iter().find(|s| s.name == "bad").unwrap();
    assert_eq!(bad.runs[0].exit_code, Some(3));
    assert!(bad.runs[0].log_tail.iter().any(|l| l.contains("failing on purpose")), "{:?}", bad.runs[0].log_tail);

    let p = f.pipeline("go.yml", &text("go"));
    let r = f.run(&p, 2, true).await;
    assert!(!r.ok);
    assert_eq!(state(&r, "bad"), StepState::Failed);
    assert_eq!(state(&r, "after_bad"), StepState::Skipped);
    assert_eq!(state(&r, "slow"), StepState::Done);
    assert_eq!(state(&r, "after_slow"), StepState::Done, "--keep-going runs what does not depend on the failure");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_reports_every_problem_with_step_and_line() {
    let img = tool_image();
    let f = fixture();
    f.write("in/a.txt", "a");
    let missing = kliko_testkit::unique_tag("pipeline-missing");
    let text = format!(
        "version: 1
steps:
  a:
    image: {0}
    input: b
  b:
    image: {0}
    input: [a]
  c:
    image: {0}
    input: [in/, nosuch]
  d:
    image: {0}
    params:
      tag: ok
      colour: red
  e:
    image: {missing}
  f:
    image: {0}
    input: nowhere/
",
        img.tag
    );
    let p = f.pipeline("bad.yml", &text);
    let e = check(&f.engine, &p).await.unwrap_err();
    let PipelineError::Invalid { problems, .. } = &e else { panic!("{e}") };
    let msg = e.to_string();
    let has = |line: usize, step: &str, what: &str| {
        problems.iter().any(|p| p.line == Some(line) && p.step.as_deref() == Some(step) && p.message.contains(what))
    };
    assert!(has(3, "a", "cycle"), "{msg}");
    assert!(has(11, "c", "unknown step `nosuch`"), "{msg}");
    assert!(has(16, "d", "unknown parameter `colour`"), "{msg}");
    assert!(has(18, "e", &format!("cannot use image `{missing}`")), "{msg}");
    assert!(has(21, "f", "does not exist"), "{msg}");
    assert_eq!(problems.len(), 5, "{msg}");
    assert!(msg.contains("line 16: step `d`: unknown parameter `colour`"), "{msg}");
    assert!(Path::new(&p.file).is_absolute());
}
