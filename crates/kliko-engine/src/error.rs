use std::path::PathBuf;

use kliko_core::Digest;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Runtime(#[from] kliko_runtime::RuntimeError),
    #[error(transparent)]
    Store(#[from] kliko_store::StoreError),
    #[error(transparent)]
    Remote(#[from] kliko_remote::RemoteError),
    #[error(transparent)]
    Spec(#[from] kliko_spec::SpecError),
    #[error("invalid parameters for `{image}`:\n{errors}")]
    Params { image: String, errors: kliko_spec::ParamErrors },
    #[error("i/o error on `{}`", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the output folder `{}` is not empty", path.display())]
    OutputNotEmpty { path: PathBuf },
    #[error("`{}` does not exist", path.display())]
    NoSuchPath { path: PathBuf },
    #[error("`{}` is not a folder", path.display())]
    NotADir { path: PathBuf },
    /// The run was asked in the other io mode than the image's (`given`), or a join image was
    /// given no work folder (`given: None`).
    #[error("image `{image}` {}", io_problem(*.mode, *.given))]
    IoMode { image: String, mode: kliko_spec::IoMode, given: Option<kliko_spec::IoMode> },
    #[error("the parameter file `{}` changed while the run was being prepared", path.display())]
    ParamFileChanged { path: PathBuf },
    #[error(
        "the store's path `{}` is not valid UTF-8, and the container runtime can only mount folders whose path is",
        path.display()
    )]
    StoreNotUtf8 { path: PathBuf },
    #[error("the leader running `{key}` failed")]
    LeaderFailed { key: Digest },
    #[error("could not take the lease of run `{key}`")]
    Lease {
        key: Digest,
        #[source]
        source: std::io::Error,
    },
    /// A join run's work folder changed while the run went on: it is left as it is.
    #[error(
        "the work folder `{}` changed while the run went on, so it was left as it is; the result is stored as \
         tree `{result}`, and the folder's current contents as tree `{now}`",
        path.display()
    )]
    WorkFolderChanged { path: PathBuf, result: Digest, now: Digest },
    #[error("the work folder `{}` changed while the run was being prepared", path.display())]
    WorkChangedBeforeRun { path: PathBuf },
    /// Neither a path that exists nor a digest (prefix) the store knows.
    #[error("`{arg}`: {}", if *.hex { "no stored run, tree or file has this digest or prefix" } else { "not a path that exists, nor a hex digest or prefix of at least 8 characters" })]
    UnknownRef { arg: String, hex: bool },
    #[error("a background task failed: {0}")]
    Join(String),
    /// A cluster's scheduler refused or failed a job (the message names the command and says
    /// what it printed).
    #[error("{0}")]
    Scheduler(String),
    /// A broken promise inside kliko (a bug): what went wrong.
    #[error("internal error: {0}")]
    Internal(String),
}

fn io_problem(mode: kliko_spec::IoMode, given: Option<kliko_spec::IoMode>) -> String {
    use kliko_spec::IoMode;
    let what = match mode {
        IoMode::Split => "reads `/input` and writes `/output` (io mode `split`)",
        IoMode::Join => "changes `/work` in place (io mode `join`)",
    };
    let problem = match (mode, given) {
        (IoMode::Split, _) => "it takes an input and an output folder, not a work folder",
        (IoMode::Join, Some(_)) => "it takes a work folder, not an input and an output folder",
        (IoMode::Join, None) => "it needs a work folder",
    };
    format!("{what}: {problem}")
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| EngineError::Io { path: path.into(), source })
    }
}

/// Run blocking store work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| EngineError::Join(e.to_string()))?
}

pub(crate) use kliko_core::error_chain as chain;
