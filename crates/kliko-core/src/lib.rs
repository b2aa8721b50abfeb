//! kliko-core owns the formats every other kliko crate agrees on: the [`Digest`] (BLAKE3),
//! the canonical directory [`tree`] format (a Merkle tree), the action key pre-image
//! ([`key::ActionPreimage`]), and hashing host files and trees in parallel with an optional
//! persistent stat cache ([`hash`]). It is synchronous: no tokio, no I/O beyond reading the
//! paths it is asked to hash. `cache-format.md` at the top of the repository is the spec.
//!
//! ```
//! use kliko_core::hash::Hasher;
//! let dir = tempfile::tempdir().unwrap();
//! std::fs::write(dir.path().join("a.txt"), b"hello\n").unwrap();
//! let file = Hasher::default().hash_path(&dir.path().join("a.txt")).unwrap();
//! // A file's digest is plain BLAKE3, what `b3sum` prints.
//! assert_eq!(file.digest.to_hex(), "8e4c7c1b99dbfd50e7a95185fead5ee1448fa904a2fdd778eaf5f2dbfd629a99");
//! let tree = Hasher::default().hash_path(dir.path()).unwrap();
//! assert!(tree.is_dir);
//! ```

pub mod canonical;
mod digest;
pub mod hash;
pub mod key;
pub mod process;
pub mod trace;
pub mod tree;
pub mod units;

pub use digest::{BadDigest, Digest};

/// The version of the kliko store and key formats this build reads and writes.
pub const STORE_FORMAT_VERSION: u32 = 1;
