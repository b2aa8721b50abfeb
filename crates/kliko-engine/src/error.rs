use std::path::PathBuf;

use kliko_core::Digest;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Runtime(#[from] kliko_runtime::RuntimeError),
    #[error(transparent)]
    Store(#[from] kliko_store::StoreError),
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
    #[error("image `{image}` uses io mode `{mode}`: {what}")]
    IoMode { image: String, mode: String, what: String },
    #[error("the parameter file `{}` changed while the run was being prepared", path.display())]
    ParamFileChanged { path: PathBuf },
    #[error(
        "the store's path `{}` is not valid UTF-8, and the container runtime can only mount folders whose path is",
        path.display()
    )]
    StoreNotUtf8 { path: PathBuf },
    #[error("the leader running `{key}` failed")]
    LeaderFailed { key: Digest },
    #[error("a background task failed: {0}")]
    Join(String),
    #[error("invalid value for `{what}`: {message}")]
    Invalid { what: String, message: String },
}

impl EngineError {
    /// A hint for the user, in their terms, where one helps.
    pub fn hint(&self) -> Option<String> {
        match self {
            EngineError::OutputNotEmpty { .. } => {
                Some("choose an empty or new folder, or pass `--overwrite` to replace its contents".into())
            }
            EngineError::Params { image, .. } => Some(format!("`kliko run {image} --help` lists the parameters")),
            EngineError::StoreNotUtf8 { .. } => {
                Some("put the store in a folder whose path is valid UTF-8 (`--store DIR` or `KLIKO_STORE`)".into())
            }
            EngineError::IoMode { .. } => {
                Some("split images take `--input DIR --output DIR`; join images take `--work DIR`".into())
            }
            _ => None,
        }
    }
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
