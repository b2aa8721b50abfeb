use std::io;
use std::path::PathBuf;

use kliko_core::Digest;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("i/o error on `{}`", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the store index at `{}` cannot be used", path.display())]
    Db {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    /// The store is on a read-only filesystem and the operation would change it.
    #[error("the store at `{}` is read-only (on a read-only filesystem): {what}", path.display())]
    ReadOnly { path: PathBuf, what: String },
    /// The store had an index, and it is gone: never replaced by an empty one in silence.
    #[error(
        "the store's index at `{}` is missing: the results, pins and history recorded in it cannot be read",
        path.display()
    )]
    IndexLost { path: PathBuf },
    #[error(transparent)]
    Hash(#[from] kliko_core::hash::HashError),
    #[error("stored object `{digest}` is missing")]
    Missing { digest: Digest },
    #[error("stored object `{expected}` is corrupt (its content hashes to `{actual}`); run `kliko store fsck`")]
    Corrupt { expected: Digest, actual: Digest },
    #[error("stored tree `{digest}` cannot be decoded")]
    BadTree {
        digest: Digest,
        #[source]
        source: kliko_core::tree::TreeError,
    },
    #[error("`{}` is not empty", path.display())]
    NotEmpty { path: PathBuf },
    #[error("the store at `{}` has format `{found}`, this kliko reads `{expected}`", path.display())]
    Format { path: PathBuf, found: String, expected: String },
    #[error("record `{key}` in the store index is unreadable")]
    BadRecord {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("`{prefix}` matches more than one stored object: {candidates}")]
    Ambiguous { prefix: String, candidates: String },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| StoreError::Io { path: path.into(), source })
    }
}
