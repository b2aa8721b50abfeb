//! `kliko run-plan`: one run of a pipeline on a cluster node, as the Slurm executor's job
//! script calls it (hidden from `--help`: people run `kliko pipeline run --executor slurm`).
//!
//! The node's own local store (`$KLIKO_NODE_STORE`, else `kliko-node-<uid>` in `$TMPDIR` or
//! `/tmp`: node-local disk, never a store another machine opens) and the plan's shared tier.
//! The run goes the usual way (lookup → lease → container → record, published to the tier
//! before this command ends), so a job whose result another job recorded meanwhile ends at
//! once. Logs go to standard output and error, which Slurm keeps in the job's output file.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use kliko_engine::{Event, Observer, Status, Stream};
use kliko_pipeline::slurm::{Plan, PLAN_VERSION};
use tokio_util::sync::CancellationToken;

/// Where a node keeps its local store.
pub fn node_store() -> PathBuf {
    if let Some(s) = std::env::var_os("KLIKO_NODE_STORE").filter(|s| !s.is_empty()) {
        return PathBuf::from(s);
    }
    let tmp = std::env::var_os("TMPDIR").filter(|s| !s.is_empty()).map(PathBuf::from).unwrap_or("/tmp".into());
    // SAFETY: getuid cannot fail.
    tmp.join(format!("kliko-node-{}", unsafe { libc::getuid() }))
}

struct Print;

impl Observer for Print {
    fn log(&self, stream: Stream, bytes: &[u8]) {
        let _ = match stream {
            Stream::Stdout => std::io::stdout().lock().write_all(bytes),
            Stream::Stderr => std::io::stderr().lock().write_all(bytes),
        };
    }
    fn event(&self, event: &Event) {
        match event {
            Event::Warning(w) => eprintln!("kliko: warning: {w}"),
            Event::Waiting { holder } => {
                eprintln!("kliko: an identical run is in progress on `{}`; waiting for it", holder.host)
            }
            Event::Starting => eprintln!("kliko: starting the container"),
            Event::Hit { key } => eprintln!("kliko: {key} is already recorded"),
            _ => {}
        }
    }
}

pub fn run(plan_json: Option<String>, plan_file: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let text = match (plan_json, plan_file) {
        (Some(j), _) => j,
        (None, Some(f)) => {
            std::fs::read_to_string(&f).with_context(|| format!("cannot read the plan `{}`", f.display()))?
        }
        (None, None) => anyhow::bail!("give the run's plan: `--plan-json JSON` or `--plan FILE`"),
    };
    let plan: Plan = serde_json::from_str(&text).context("the plan is not one this kliko reads")?;
    if plan.kliko_plan != PLAN_VERSION {
        anyhow::bail!(
            "the plan is version {} and this kliko reads version {PLAN_VERSION}: the nodes need the same kliko as the dispatcher",
            plan.kliko_plan
        );
    }
    let root = node_store();
    eprintln!(
        "kliko: step `{}`{} on `{}`: key {}, store `{}`",
        plan.step,
        plan.entry.as_ref().map(|e| format!(" entry `{e}`")).unwrap_or_default(),
        kliko_engine::hostname(),
        plan.key,
        root.display()
    );
    let rt = crate::runtime()?;
    rt.block_on(async move {
        let store = Arc::new(
            kliko_store::Store::open(&root)
                .with_context(|| format!("cannot open this node's store at `{}`", root.display()))?,
        );
        let remote = kliko_remote::Remote::open(&plan.remote, false)?.with_user_keys()?;
        let (objects, bytes) = remote
            .fetch_tree(&store, &plan.input)
            .await
            .with_context(|| format!("cannot fetch the run's input {} from the shared tier", plan.input))?;
        if objects > 0 {
            eprintln!("kliko: fetched the input: {objects} objects, {}", kliko_core::units::human_bytes(bytes));
        }
        // File parameters this node does not see as the dispatcher did: copies from the tier,
        // in a private folder that lives as long as the run (nothing is fetched when every
        // one is here unchanged).
        let mut plan = plan;
        let unseen = plan.unseen_param_files();
        let _copies = match plan.param_files.as_ref().map(|p| p.tree).filter(|_| !unseen.is_empty()) {
            None => None,
            Some(tree) => {
                remote
                    .fetch_tree(&store, &tree)
                    .await
                    .with_context(|| format!("cannot fetch the run's file parameters {tree} from the shared tier"))?;
                let folder = store.run_folder("param-files")?;
                let dir = folder.path().join("files");
                store.materialize(&tree, &dir, kliko_store::MaterializeMode::Copy)?;
                plan = plan.with_param_copies(&dir, &unseen);
                Some(folder)
            }
        };
        let mut engine = crate::engine_with(store, Some(remote))?;
        if let Some(rt) = &plan.runtime {
            let kind = kliko_runtime::RuntimeKind::parse(rt).map_err(|e| anyhow::anyhow!("the plan's runtime: {e}"))?;
            engine = engine.with_runtime_kind(kind);
        }
        let cancel = CancellationToken::new();
        crate::cancel_on_signal(cancel.clone(), "kliko: stopping: the container is being stopped; nothing is recorded");
        let obs: Arc<dyn Observer> = Arc::new(Print);
        let req = plan.request().map_err(|e| anyhow::anyhow!("the plan's `gpus`: {e}"))?;
        let (prep, hit) = engine.lookup(&req, None, &obs).await?;
        if prep.key != plan.key {
            anyhow::bail!(
                "this run's key here ({}) is not the dispatcher's ({}): the image differs on this node (the same image \
                 ID must be on every node), or a file parameter changed after it was submitted; nothing was run",
                prep.key,
                plan.key
            );
        }
        if hit.is_some() {
            return Ok(ExitCode::SUCCESS);
        }
        let image = prep.image.clone();
        let report = engine.run_with(req, Some(image), None, obs, cancel).await?;
        eprintln!("kliko: {:?}, exit code {}", report.status, report.exit_code);
        Ok(match report.status {
            Status::Succeeded => ExitCode::SUCCESS,
            Status::Cancelled => ExitCode::from(130),
            _ => ExitCode::from(u8::try_from(report.exit_code).ok().filter(|&c| c != 0).unwrap_or(1)),
        })
    })
}
