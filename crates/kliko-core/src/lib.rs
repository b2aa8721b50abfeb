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
pub mod svg;
pub mod trace;
pub mod tree;
pub mod units;

pub use digest::{BadDigest, Digest};

/// An error and its causes, joined by `: ` (for a warning line). A cause whose text the line
/// already holds is left out (libraries often repeat their cause in their own message).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// The version of the kliko store and key formats this build reads and writes.
pub const STORE_FORMAT_VERSION: u32 = 1;
