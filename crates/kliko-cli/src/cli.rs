use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Run kliko images as memoized pure functions: never compute the same thing twice.
#[derive(Parser, Debug)]
#[command(name = "kliko", version, propagate_version = true, max_term_width = 100)]
pub struct Cli {
    /// The store (cache) folder. Default: `$KLIKO_STORE`, else `$XDG_CACHE_HOME/kliko`, else
    /// `~/.cache/kliko`.
    #[arg(long, global = true, env = "KLIKO_STORE", value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// A cache shared by many machines, beside the local store: `s3://BUCKET/PREFIX`
    /// (credentials and endpoint from the `AWS_*` variables) or a shared folder (an absolute
    /// path or `file:///PATH`). A local miss looks there first; a new result is published
    /// there. Default: `$KLIKO_REMOTE`. Give it before the command: `kliko --remote URL run ...`.
    #[arg(long, global = true, env = "KLIKO_REMOTE", value_name = "URL")]
    pub remote: Option<String>,
    /// Read results from the shared tier, never write to it.
    #[arg(long, global = true)]
    pub remote_read_only: bool,
    /// Report a run done as soon as its output is in place, and publish it to the shared tier
    /// in the background (the command ends when the upload has; a pipeline's next steps start
    /// meanwhile).
    #[arg(long, global = true)]
    pub remote_async: bool,
    /// The container runtime: `docker`, or `podman` (rootless: your own Podman socket, or a
    /// `podman system service` started for the command and stopped after it; `DOCKER_HOST`
    /// still wins when set). The same image has the same ID, and so the same results, under
    /// both. Default: `$KLIKO_RUNTIME`, else `docker`. Give it before the command.
    #[arg(long, global = true, env = "KLIKO_RUNTIME", value_name = "RUNTIME", value_parser = kliko_runtime::RuntimeKind::parse)]
    pub runtime: Option<kliko_runtime::RuntimeKind>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a kliko image, or reuse the identical earlier run (`kliko run IMAGE --help` lists its parameters).
    #[command(disable_help_flag = true)]
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0.., value_name = "IMAGE [OPTIONS]")]
        args: Vec<std::ffi::OsString>,
    },
    /// Check kliko.yml files: exit 0 when all are valid, 1 with messages when not.
    Validate {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Print the digest of files (plain BLAKE3, as `b3sum`) and folders (kliko tree digest).
    Hash(HashArgs),
    /// Inspect and maintain the store.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Run a pipeline of kliko images (a YAML file), or show its graph and what is cached.
    #[command(subcommand)]
    Pipeline(PipelineCommand),
    /// Serve the web interface: a form per kliko image, live runs, history and provenance.
    Serve(ServeArgs),
    /// The shared tier (`--remote`): check it, see what it holds, publish to it, clean it; and
    /// this user's signing key.
    #[command(subcommand)]
    Remote(RemoteCommand),
    #[command(flatten)]
    Cache(CacheCommand),
    /// One run of a pipeline on a cluster node, as `--executor slurm` submits it (its store:
    /// `$KLIKO_NODE_STORE`, else `kliko-node-<uid>` in `$TMPDIR` or `/tmp`).
    #[command(hide = true)]
    RunPlan {
        /// The plan, as JSON.
        #[arg(long, value_name = "JSON", conflicts_with = "plan")]
        plan_json: Option<String>,
        /// The plan, in a file.
        #[arg(long, value_name = "FILE")]
        plan: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
pub struct HashArgs {
    /// Files or folders to hash.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// One JSON object per path, one per line.
    #[arg(long)]
    pub json: bool,
    /// Do not use or update the stat cache (read every file).
    #[arg(long)]
    pub no_stat_cache: bool,
}

#[derive(Subcommand, Debug)]
pub enum RemoteCommand {
    /// Is the shared tier usable: reachable, credentials accepted, writable, conditional writes
    /// honoured (needed for leases across machines); its latency and throughput.
    Check {
        /// Bytes to upload and download to measure throughput (`0`: skip).
        #[arg(long, default_value = "32m", value_name = "SIZE")]
        probe_size: String,
        #[arg(long)]
        json: bool,
    },
    /// How many records and objects the shared tier holds.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Publish every result of the local store that the shared tier lacks (what a run could
    /// not publish while the tier was unreachable, or a store made before there was a tier).
    Push {
        #[arg(long)]
        json: bool,
    },
    /// Remove records written more than AGE ago, then the objects no remaining record names
    /// that are older than the grace period. Safe while machines publish.
    Gc {
        /// Records last written longer ago than this are removed, e.g. `90d`.
        #[arg(long, value_name = "AGE")]
        older_than: String,
        /// Objects no record names are kept until this old (a machine may be publishing them).
        #[arg(long, default_value = "1d", value_name = "AGE")]
        grace: String,
        /// Count what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// This user's signing key: records published to the tier are signed with it.
    #[command(subcommand)]
    Key(KeyCommand),
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Make a signing key (never replaces one) and print its public key, for others'
    /// `KLIKO_TRUSTED_KEYS`.
    New,
    /// Print the public key of this user's signing key.
    Show,
}

#[derive(Subcommand, Debug)]
pub enum StoreCommand {
    /// Re-hash every stored object; quarantine corrupt ones; find results with missing objects.
    Fsck {
        /// Also delete results that name missing objects, move stray files and unusable cached
        /// image files to quarantine/, and remove temporary files of dead processes.
        #[arg(long)]
        repair: bool,
        #[arg(long)]
        json: bool,
    },
    /// How much the store holds.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Copy a folder or file into the store and print its digest.
    Ingest {
        path: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Rebuild a lost or damaged index from what is left of it and from the result files kept
    /// beside it; say what could not be recovered.
    Repair {
        #[arg(long)]
        json: bool,
    },
    /// Recreate a stored tree in a folder (which must be empty or absent).
    Materialize {
        /// Tree digest.
        digest: String,
        dest: PathBuf,
        #[arg(long, value_enum, default_value_t = Placement::Auto)]
        mode: Placement,
    },
}

/// How stored files are placed in a host folder.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Read-only hard links (instant), unless running as root or across filesystems: then copies.
    Auto,
    /// Read-only hard links to the stored files.
    Link,
    /// Writable copies (reflinks where the filesystem can), verified against their digests.
    Copy,
}

impl From<Placement> for kliko_store::MaterializeMode {
    fn from(p: Placement) -> Self {
        match p {
            Placement::Auto => kliko_store::MaterializeMode::Auto,
            Placement::Link => kliko_store::MaterializeMode::Link,
            Placement::Copy => kliko_store::MaterializeMode::Copy,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum CacheCommand {
    /// Every run that produced a result: ARG is a run key, an output tree or file digest, a
    /// hex prefix (8+ characters), or a path (hashed to find it).
    Provenance {
        arg: String,
        /// How many steps of lineage to follow back through the runs that produced inputs.
        #[arg(long, default_value_t = 10)]
        depth: usize,
        #[arg(long, conflicts_with = "dot")]
        json: bool,
        /// Print the lineage as a Graphviz graph (`| dot -Tsvg > lineage.svg`).
        #[arg(long, conflicts_with = "ro_crate")]
        dot: bool,
        /// Write the answer as an RO-Crate (Process Run Crate 0.5) to this new folder, or to a
        /// `.zip`: every run with its image, parameters, times, agent and host; inputs and
        /// outputs by digest.
        #[arg(long, value_name = "OUT")]
        ro_crate: Option<PathBuf>,
        /// With `--ro-crate`: put the outputs and logs themselves in the crate.
        #[arg(long, requires = "ro_crate")]
        with_data: bool,
        /// With `--ro-crate`: the crate's licence (a URL such as
        /// `https://spdx.org/licenses/CC-BY-4.0`, or words).
        #[arg(long, requires = "ro_crate", value_name = "LICENSE")]
        license: Option<String>,
    },
    /// A stored result and its logs.
    Show {
        /// Run key (or an unambiguous prefix).
        key: String,
        #[arg(long)]
        json: bool,
        /// Do not print the stored logs.
        #[arg(long)]
        no_logs: bool,
    },
    /// Runs, newest first: hits and misses, what each cost and saved.
    History {
        /// Only runs of this image (reference or ID).
        #[arg(long)]
        image: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Protect a result from `kliko gc`.
    Pin { key: String },
    /// Let `kliko gc` evict a result again.
    Unpin { key: String },
    /// Evict least recently used results, then delete objects nothing needs any more, and
    /// what dead processes left. Safe while other runs read and write the store; works on a
    /// full disk.
    Gc {
        /// Evict results until what remains fits, e.g. `50g`.
        #[arg(long, value_name = "SIZE")]
        max_size: Option<String>,
        /// Evict results not used for this long, e.g. `30d`, `12h`, `500ms`.
        #[arg(long, value_name = "AGE")]
        older_than: Option<String>,
        /// Show what would go; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Never delete objects younger than this (work of runs in progress), e.g. `1h`, `0s`.
        #[arg(long, value_name = "AGE", default_value = "1h")]
        grace: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on. Any non-loopback address requires the access token.
    #[arg(long, default_value = "127.0.0.1:8765", value_name = "ADDR")]
    pub bind: String,
    /// A folder the browser may use for inputs and outputs (repeatable). Default: the current folder.
    #[arg(long, value_name = "DIR")]
    pub data_root: Vec<PathBuf>,
    /// Access token required on every request (generated and printed for a non-loopback `--bind`).
    #[arg(long, env = "KLIKO_WEB_TOKEN", value_name = "TOKEN")]
    pub token: Option<String>,
    /// Largest upload of one form (`500M`, `1G`, ...).
    #[arg(long, default_value = "1G", value_name = "SIZE")]
    pub upload_limit: String,
    /// Connections served at once; further ones wait until one closes.
    #[arg(long, default_value_t = kliko_web::DEFAULT_MAX_CONNECTIONS, value_name = "N")]
    pub max_connections: usize,
}

/// Where a pipeline's steps run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExecutorChoice {
    Local,
    Slurm,
    Srun,
}

#[derive(Subcommand, Debug)]
pub enum PipelineCommand {
    /// Run every step; unchanged steps are cache hits and start no container.
    Run {
        /// The pipeline file (see `crates/kliko-pipeline/README.md`).
        file: PathBuf,
        /// Runs (steps or foreach entries) at once. Default: the number of CPUs.
        #[arg(long, short = 'j', value_name = "N")]
        jobs: Option<usize>,
        /// After a step fails, keep running the steps that do not depend on it.
        #[arg(long, short = 'k')]
        keep_going: bool,
        /// Print one JSON object with every step's result on stdout.
        #[arg(long)]
        json: bool,
        /// Show the containers' logs, each line prefixed with its step.
        #[arg(long, short = 'v')]
        verbose: bool,
        /// Where the steps run: `local` (this machine), `slurm` (each miss a Slurm job,
        /// submitted with `sbatch`; needs a shared tier), `srun` (each miss an `srun` inside
        /// the allocation this command runs in). Default: `$KLIKO_EXECUTOR`, else `local`.
        #[arg(long, value_enum, env = "KLIKO_EXECUTOR", default_value = "local")]
        executor: ExecutorChoice,
        /// Afterwards, write an RO-Crate (Provenance Run Crate 0.5) of the pipeline run to this
        /// new folder or `.zip`: the pipeline file as the workflow, its steps, and every run
        /// that made the pipeline's results (hits included).
        #[arg(long, value_name = "OUT")]
        ro_crate: Option<PathBuf>,
    },
    /// Print the graph and, where the inputs are known, each step's key and whether it would hit.
    Show {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// List pipeline runs, newest first (from the command line and from the web interface).
    History {
        /// Only the runs of this pipeline file.
        file: Option<PathBuf>,
        /// At most this many.
        #[arg(long, short = 'n', default_value_t = 20)]
        limit: usize,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}
