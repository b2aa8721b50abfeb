//! The canonical tree (Merkle) format. `cache-format.md` is the specification; this is the
//! reference implementation.
//!
//! ```text
//! tree     = magic count entry*            ; entries sorted by name bytes, names unique
//! magic    = "kliko-tree-v1\n"              ; 14 bytes
//! count    = u64 little-endian
//! entry    = kind name-len name payload
//! kind     = 0x01 file | 0x02 symlink | 0x03 directory
//! name-len = u32 little-endian, name = that many bytes (not empty, no '/', no NUL, not . or ..)
//! file     = size:u64le executable:u8(0|1) digest:32   ; digest = plain BLAKE3 of the content
//! symlink  = target-len:u32le target                   ; target bytes as read, never followed
//! directory= digest:32                                 ; the child tree's digest
//! digest(tree) = BLAKE3 derive_key(TREE_CONTEXT, tree bytes)
//! ```

use std::collections::BTreeMap;

use crate::Digest;

/// The BLAKE3 key-derivation context of tree digests.
pub const TREE_CONTEXT: &str = "kliko 2026-11-26 tree v1";
/// The first bytes of every encoded tree.
pub const TREE_MAGIC: &[u8; 14] = b"kliko-tree-v1\n";

const KIND_FILE: u8 = 1;
const KIND_SYMLINK: u8 = 2;
const KIND_DIR: u8 = 3;

/// One entry of a directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    File { size: u64, executable: bool, digest: Digest },
    Symlink { target: Vec<u8> },
    Dir { digest: Digest },
}

/// One directory level: its entries by name (sorted by bytes, which `BTreeMap<Vec<u8>>` gives).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tree {
    pub entries: BTreeMap<Vec<u8>, Entry>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TreeError {
    #[error("tree encoding is truncated at byte {0}")]
    Truncated(usize),
    #[error("tree encoding does not start with the `kliko-tree-v1` magic")]
    BadMagic,
    #[error("tree entry {index} has unknown kind byte {kind}")]
    BadKind { index: u64, kind: u8 },
    #[error("tree entry name `{}` is not allowed", String::from_utf8_lossy(.0))]
    BadName(Vec<u8>),
    #[error("tree entries are not sorted by name or not unique at `{}`", String::from_utf8_lossy(.0))]
    Unsorted(Vec<u8>),
    #[error("tree encoding has {0} trailing bytes")]
    Trailing(usize),
}

/// Whether `name` may appear in a tree.
pub fn valid_name(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.contains(&b'/') && !name.contains(&0)
}

impl Tree {
    pub fn new() -> Tree {
        Tree::default()
    }

    /// Insert an entry; returns an error for names the format forbids.
    pub fn insert(&mut self, name: Vec<u8>, entry: Entry) -> Result<(), TreeError> {
        if !valid_name(&name) {
            return Err(TreeError::BadName(name));
        }
        self.entries.insert(name, entry);
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(22 + self.entries.len() * 64);
        out.extend_from_slice(TREE_MAGIC);
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for (name, entry) in &self.entries {
            let kind = match entry {
                Entry::File { .. } => KIND_FILE,
                Entry::Symlink { .. } => KIND_SYMLINK,
                Entry::Dir { .. } => KIND_DIR,
            };
            out.push(kind);
            out.extend_from_slice(&(name.len() as u32).to_le_bytes());
            out.extend_from_slice(name);
            match entry {
                Entry::File { size, executable, digest } => {
                    out.extend_from_slice(&size.to_le_bytes());
                    out.push(u8::from(*executable));
                    out.extend_from_slice(digest.as_bytes());
                }
                Entry::Symlink { target } => {
                    out.extend_from_slice(&(target.len() as u32).to_le_bytes());
                    out.extend_from_slice(target);
                }
                Entry::Dir { digest } => out.extend_from_slice(digest.as_bytes()),
            }
        }
        out
    }

    /// The digest of an encoded tree.
    pub fn digest_of_encoding(bytes: &[u8]) -> Digest {
        Digest::derive(TREE_CONTEXT, bytes)
    }

    pub fn digest(&self) -> Digest {
        Tree::digest_of_encoding(&self.encode())
    }

    /// Parse an encoded tree, checking every rule of the format (so a decoded tree re-encodes
    /// to the same bytes).
    pub fn decode(bytes: &[u8]) -> Result<Tree, TreeError> {
        let mut r = Reader { bytes, pos: 0 };
        if r.take(TREE_MAGIC.len())? != TREE_MAGIC {
            return Err(TreeError::BadMagic);
        }
        let count = r.u64()?;
        let mut tree = Tree::new();
        let mut last: Option<Vec<u8>> = None;
        for index in 0..count {
            let kind = r.take(1)?[0];
            let name_len = r.u32()? as usize;
            let name = r.take(name_len)?.to_vec();
            if !valid_name(&name) {
                return Err(TreeError::BadName(name));
            }
            if last.as_ref().is_some_and(|l| *l >= name) {
                return Err(TreeError::Unsorted(name));
            }
            let entry = match kind {
                KIND_FILE => {
                    let size = r.u64()?;
                    let executable = match r.take(1)?[0] {
                        0 => false,
                        1 => true,
                        other => return Err(TreeError::BadKind { index, kind: other }),
                    };
                    Entry::File { size, executable, digest: r.digest()? }
                }
                KIND_SYMLINK => {
                    let len = r.u32()? as usize;
                    Entry::Symlink { target: r.take(len)?.to_vec() }
                }
                KIND_DIR => Entry::Dir { digest: r.digest()? },
                other => return Err(TreeError::BadKind { index, kind: other }),
            };
            last = Some(name.clone());
            tree.entries.insert(name, entry);
        }
        if r.pos != bytes.len() {
            return Err(TreeError::Trailing(bytes.len() - r.pos));
        }
        Ok(tree)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TreeError> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.bytes.len());
        let end = end.ok_or(TreeError::Truncated(self.pos))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, TreeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, TreeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn digest(&mut self) -> Result<Digest, TreeError> {
        Ok(Digest::from_slice(self.take(32)?).expect("32 bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Tree {
        let mut t = Tree::new();
        t.insert(b"b.txt".to_vec(), Entry::File { size: 6, executable: false, digest: Digest::of_bytes(b"hello\n") })
            .unwrap();
        t.insert(b"a".to_vec(), Entry::Symlink { target: b"b.txt".to_vec() }).unwrap();
        t.insert(b"sub".to_vec(), Entry::Dir { digest: Tree::new().digest() }).unwrap();
        t
    }

    #[test]
    fn round_trip() {
        let t = sample();
        let bytes = t.encode();
        assert_eq!(Tree::decode(&bytes).unwrap(), t);
        assert_eq!(Tree::digest_of_encoding(&bytes), t.digest());
    }

    #[test]
    fn decode_rejects_bad_input() {
        let bytes = sample().encode();
        assert_eq!(Tree::decode(&bytes[..bytes.len() - 1]), Err(TreeError::Truncated(bytes.len() - 32)));
        let mut extra = bytes.clone();
        extra.push(0);
        assert_eq!(Tree::decode(&extra), Err(TreeError::Trailing(1)));
        assert_eq!(Tree::decode(b"nope"), Err(TreeError::Truncated(0)));
        let mut bad_magic = bytes.clone();
        bad_magic[0] = b'K';
        assert_eq!(Tree::decode(&bad_magic), Err(TreeError::BadMagic));
    }

    #[test]
    fn names_are_checked() {
        let mut t = Tree::new();
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b"] {
            assert!(t.insert(bad.to_vec(), Entry::Symlink { target: vec![] }).is_err());
        }
        // Non-UTF-8 names are fine.
        t.insert(vec![0xff, 0xfe], Entry::Symlink { target: vec![0xff] }).unwrap();
        assert_eq!(Tree::decode(&t.encode()).unwrap(), t);
    }

    #[test]
    fn empty_tree_digest_is_pinned() {
        // Golden: listed in cache-format.md.
        assert_eq!(Tree::new().encode(), b"kliko-tree-v1\n\0\0\0\0\0\0\0\0");
        assert_eq!(Tree::new().digest().to_hex(), EMPTY_TREE_HEX);
    }

    const EMPTY_TREE_HEX: &str = "f4069c038369f94c7d0fe580331e5e87650f54860704d7c2c89ce0b9a3ac9dd4";

    /// splitmix64: reproducible test input without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Property: decoding any bytes never panics, and whatever decodes re-encodes to the same
    /// bytes (a decoder accepts only canonical encodings). Inputs: random bytes, and valid
    /// encodings with random damage (bit flips, truncation, inserted, deleted and overwritten
    /// bytes, lengths set to extremes), 20 000 cases, the seed printed on failure.
    #[test]
    fn decoding_arbitrary_bytes_never_panics_and_only_accepts_canonical_encodings() {
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
        let mut rng = Rng(seed);
        let mut valid = vec![sample().encode(), Tree::new().encode()];
        let mut big = sample();
        for i in 0..20u8 {
            big.insert(vec![b'n', b'a' + i], Entry::Symlink { target: vec![i; i as usize] }).unwrap();
        }
        valid.push(big.encode());
        let (mut accepted, mut cases) = (0, 0);
        for _ in 0..20_000 {
            let mut bytes = if rng.below(4) == 0 {
                let mut b = TREE_MAGIC.to_vec();
                b.extend((0..rng.below(200)).map(|_| rng.next() as u8));
                b
            } else {
                valid[rng.below(valid.len())].clone()
            };
            for _ in 0..=rng.below(3) {
                if bytes.is_empty() {
                    break;
                }
                let at = rng.below(bytes.len());
                match rng.below(6) {
                    0 => bytes[at] ^= 1 << rng.below(8),
                    1 => bytes.truncate(at),
                    2 => bytes.insert(at, rng.next() as u8),
                    3 => {
                        bytes.remove(at);
                    }
                    4 => bytes[at] = rng.next() as u8,
                    _ => {
                        let v = [0u8, 0xff, 0x7f, 0x80][rng.below(4)];
                        let end = (at + 4).min(bytes.len());
                        bytes[at..end].fill(v);
                    }
                }
            }
            cases += 1;
            let decoded = std::panic::catch_unwind(|| Tree::decode(&bytes))
                .unwrap_or_else(|_| panic!("decode panicked (seed {seed:#x}) on {bytes:02x?}"));
            if let Ok(tree) = decoded {
                accepted += 1;
                assert_eq!(tree.encode(), bytes, "a non-canonical encoding was accepted (seed {seed:#x})");
            }
        }
        assert!(accepted > 0 && accepted < cases, "{accepted} of {cases} accepted: the damage is not varied");
    }
}
