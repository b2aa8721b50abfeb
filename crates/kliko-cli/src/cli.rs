use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Run kliko images as memoized pure functions: never compute the same thing twice.
#[derive(Parser, Debug)]
#[command(name = "kliko", version, propagate_version = true, max_term_width = 100)]
pub struct Cli {
    /// The store (cache) folder. Default: `$KLIKO_STORE`, else `~/.cache/kliko`.
    #[arg(long, global = true, env = "KLIKO_STORE", value_name = "DIR")]
    pub store: Option<PathBuf>,
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
    #[command(flatten)]
    Cache(CacheCommand),
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
pub enum StoreCommand {
    /// Re-hash every stored object; quarantine corrupt ones; find results with missing objects.
    Fsck {
        /// Also delete results that name missing objects, and stale temporary files.
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
        #[arg(long)]
        json: bool,
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
    /// Evict least recently used results, then delete objects nothing needs any more.
    /// Safe while other runs read and write the store.
    Gc {
        /// Evict results until what remains fits, e.g. `50g`.
        #[arg(long, value_name = "SIZE")]
        max_size: Option<String>,
        /// Evict results not used for this long, e.g. `30d`, `12h`.
        #[arg(long, value_name = "AGE")]
        older_than: Option<String>,
        /// Show what would go; delete nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
}
