//! Hashing host files and directory trees: in parallel on all cores, with a pluggable
//! persistent stat cache so an unchanged file is not read again.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use rayon::prelude::*;

use crate::tree::{Entry, Tree};
use crate::Digest;

/// Files at least this big are hashed with BLAKE3's multithreaded, memory-mapped mode.
pub const MMAP_THRESHOLD: u64 = 1 << 20;

/// A cached digest is trusted only if the file's mtime and ctime are at least this much older
/// than the moment it was hashed (a write in the same timestamp granule could otherwise go
/// unseen: the "racy" case).
pub const RACY_WINDOW_NS: i64 = 2_000_000_000;

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("cannot read `{}`", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{}` is a {kind}: only regular files, directories and symlinks can be hashed", path.display())]
    Unsupported { path: PathBuf, kind: &'static str },
    #[error("`{}` kept changing while it was being hashed", path.display())]
    Unstable { path: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> HashError + '_ {
    move |source| HashError::Io { path: path.to_path_buf(), source }
}

/// What the stat cache remembers of one regular file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileStat {
    pub name: Vec<u8>,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub executable: bool,
    pub digest: Digest,
    /// When the digest was computed (wall clock, ns since the epoch).
    pub hashed_at_ns: i64,
}

impl FileStat {
    fn from_meta(name: Vec<u8>, m: &fs::Metadata, digest: Digest, hashed_at_ns: i64) -> FileStat {
        FileStat {
            name,
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
            executable: is_executable(m),
            digest,
            hashed_at_ns,
        }
    }

    /// Whether this record still describes the file `m` and may be trusted.
    pub fn still_valid(&self, m: &fs::Metadata) -> bool {
        let now = FileStat::from_meta(Vec::new(), m, self.digest, self.hashed_at_ns);
        self.dev == now.dev
            && self.ino == now.ino
            && self.size == now.size
            && self.mtime_ns == now.mtime_ns
            && self.ctime_ns == now.ctime_ns
            && self.executable == now.executable
            && self.mtime_ns.max(self.ctime_ns) + RACY_WINDOW_NS < self.hashed_at_ns
    }
}

/// The stat cache record of one directory: its regular files, sorted by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirRecord {
    pub files: Vec<FileStat>,
}

const DIR_RECORD_VERSION: u8 = 1;

impl DirRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + self.files.len() * 100);
        out.push(DIR_RECORD_VERSION);
        for f in &self.files {
            out.extend_from_slice(&(f.name.len() as u32).to_le_bytes());
            out.extend_from_slice(&f.name);
            for v in [f.dev, f.ino, f.size, f.mtime_ns as u64, f.ctime_ns as u64, f.hashed_at_ns as u64] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.push(u8::from(f.executable));
            out.extend_from_slice(f.digest.as_bytes());
        }
        out
    }

    /// Decode; anything unreadable (an older version, a torn value) is simply no record.
    pub fn decode(bytes: &[u8]) -> Option<DirRecord> {
        let (&version, mut rest) = bytes.split_first()?;
        if version != DIR_RECORD_VERSION {
            return None;
        }
        let mut files = Vec::new();
        let mut take = |n: usize| -> Option<&[u8]> {
            if rest.len() < n {
                return None;
            }
            let (a, b) = rest.split_at(n);
            rest = b;
            Some(a)
        };
        while let Some(len) = take(4) {
            let len = u32::from_le_bytes(len.try_into().ok()?) as usize;
            let name = take(len)?.to_vec();
            let mut nums = [0u64; 6];
            for n in &mut nums {
                *n = u64::from_le_bytes(take(8)?.try_into().ok()?);
            }
            let executable = take(1)?[0] == 1;
            let digest = Digest::from_slice(take(32)?)?;
            files.push(FileStat {
                name,
                dev: nums[0],
                ino: nums[1],
                size: nums[2],
                mtime_ns: nums[3] as i64,
                ctime_ns: nums[4] as i64,
                hashed_at_ns: nums[5] as i64,
                executable,
                digest,
            });
        }
        Some(DirRecord { files })
    }

    fn get(&self, name: &[u8]) -> Option<&FileStat> {
        self.files.binary_search_by(|f| f.name.as_slice().cmp(name)).ok().map(|i| &self.files[i])
    }
}

/// A persistent cache of file digests, keyed by a directory's absolute path.
pub trait StatCache: Sync {
    fn load(&self, dir: &Path) -> Option<DirRecord>;
    /// Remember `record` for `dir`; called only when it differs from what `load` gave.
    fn save(&self, dir: &Path, record: &DirRecord);
}

/// No caching: every file is read.
pub struct NoCache;

impl StatCache for NoCache {
    fn load(&self, _: &Path) -> Option<DirRecord> {
        None
    }
    fn save(&self, _: &Path, _: &DirRecord) {}
}

/// A stat cache in memory only, which also keeps a copy of every record another cache
/// handed out or was given while it was [`Tee`]d in front of it: hashing a tree a second time
/// in the same process (to see whether it changed) then needs no persistent cache.
#[derive(Debug, Default)]
pub struct MemoryCache {
    records: std::sync::Mutex<std::collections::HashMap<PathBuf, DirRecord>>,
}

impl StatCache for MemoryCache {
    fn load(&self, dir: &Path) -> Option<DirRecord> {
        self.records.lock().unwrap_or_else(|e| e.into_inner()).get(dir).cloned()
    }
    fn save(&self, dir: &Path, record: &DirRecord) {
        self.records.lock().unwrap_or_else(|e| e.into_inner()).insert(dir.to_path_buf(), record.clone());
    }
}

/// `cache`, with every record it loads or saves also kept in `copy`.
pub struct Tee<'a> {
    pub cache: &'a dyn StatCache,
    pub copy: &'a MemoryCache,
}

impl StatCache for Tee<'_> {
    fn load(&self, dir: &Path) -> Option<DirRecord> {
        let found = self.cache.load(dir);
        if let Some(r) = &found {
            self.copy.save(dir, r);
        }
        found
    }
    fn save(&self, dir: &Path, record: &DirRecord) {
        self.cache.save(dir, record);
        self.copy.save(dir, record);
    }
}

/// Told how far hashing has got (for a progress bar).
pub trait Progress: Sync {
    fn files_done(&self, _files: u64, _bytes: u64) {}
}

pub struct NoProgress;
impl Progress for NoProgress {}

/// Counters from one hashing pass.
#[derive(Debug, Default)]
pub struct HashStats {
    pub files: AtomicU64,
    pub dirs: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_cached: AtomicU64,
}

/// One regular file met while hashing a tree.
#[derive(Clone, Debug)]
pub struct HashedFile {
    pub path: PathBuf,
    pub size: u64,
    pub executable: bool,
    pub digest: Digest,
}

/// What a path hashed to.
#[derive(Debug)]
pub struct Hashed {
    /// The digest: a file's content digest, or a directory's tree digest.
    pub digest: Digest,
    pub is_dir: bool,
    /// With `collect`: every encoded tree (digest, bytes), children before parents.
    pub trees: Vec<(Digest, Vec<u8>)>,
    /// With `collect`: every regular file.
    pub files: Vec<HashedFile>,
    pub stats: HashStats,
}

/// How to hash a path.
pub struct Hasher<'a> {
    pub cache: &'a dyn StatCache,
    pub progress: &'a dyn Progress,
    /// Keep every tree encoding and file path (needed to ingest the tree).
    pub collect: bool,
    /// A folder this process may write a small file in (the store's `tmp/`): for files on
    /// its filesystem, "now" for the racy check is read from the filesystem itself.
    pub clock_probe_dir: Option<&'a Path>,
    /// This machine's clock (ns since the epoch); replaced in tests to skew it.
    pub now: fn() -> i64,
}

impl Default for Hasher<'_> {
    fn default() -> Self {
        Hasher { cache: &NoCache, progress: &NoProgress, collect: false, clock_probe_dir: None, now: now_ns }
    }
}

/// On a network filesystem whose clock cannot be read, "now" is taken as this much before
/// this machine's clock: a file changed there in the last five minutes is always read again.
pub const NETWORK_CLOCK_ALLOWANCE_NS: i64 = 300_000_000_000;

struct Walk<'a> {
    opts: &'a Hasher<'a>,
    stats: HashStats,
    trees: Mutex<Vec<(Digest, Vec<u8>)>>,
    files: Mutex<Vec<HashedFile>>,
    /// Per device: how far the filesystem's clock is behind ours (ns, never ahead).
    clock_lag: Mutex<std::collections::HashMap<u64, i64>>,
}

impl Walk<'_> {
    /// "Now" for files in `dir`, as the filesystem that stamps their times sees it. A file
    /// server's clock may be behind this machine's: then a file just written there has an
    /// mtime that looks old here, and its digest could be trusted while a write in the same
    /// timestamp granule goes unseen. So, as git does, "now" comes from the filesystem: a
    /// file created in [`Hasher::clock_probe_dir`] when that is on the same filesystem; on
    /// another network filesystem, our clock less [`NETWORK_CLOCK_ALLOWANCE_NS`]; on a local
    /// one (stamped by this kernel), our clock.
    fn now_for(&self, dir: &Path) -> i64 {
        let now = (self.opts.now)();
        let Ok(dev) = fs::metadata(dir).map(|m| m.dev()) else { return now - NETWORK_CLOCK_ALLOWANCE_NS };
        let mut lags = self.clock_lag.lock().expect("clock lock");
        let lag = *lags.entry(dev).or_insert_with(|| {
            let probe = self.opts.clock_probe_dir.filter(|p| fs::metadata(p).is_ok_and(|m| m.dev() == dev));
            if let Some(fs_now) = probe.and_then(filesystem_now) {
                return (now - fs_now).max(0);
            }
            if is_network_filesystem(dir) {
                NETWORK_CLOCK_ALLOWANCE_NS
            } else {
                0
            }
        });
        now - lag
    }
}

/// The filesystem's "now": the mtime of a file just created in `dir`.
fn filesystem_now(dir: &Path) -> Option<i64> {
    let f = tempfile::tempfile_in(dir).ok()?;
    let m = f.metadata().ok()?;
    Some(m.mtime() * 1_000_000_000 + m.mtime_nsec())
}

/// Whether `dir` is on a filesystem whose times another machine's clock may set.
fn is_network_filesystem(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return true };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs on a NUL-terminated path into a zeroed struct we own.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return true;
    }
    const NETWORK: [i64; 13] = [
        0x6969,               // NFS
        0x517B,               // SMB
        0xFF534D42u32 as i64, // CIFS
        0xFE534D42u32 as i64, // SMB2
        0x0BD00BD0,           // Lustre
        0x19830326,           // BeeGFS
        0x65735546,           // FUSE (sshfs, s3fs, ...)
        0x47504653,           // GPFS
        0x00C36400,           // Ceph
        0x01021997,           // 9p
        0x5346414F,           // AFS
        0x6B414653,           // kAFS
        0x013111A8,           // IBRIX
    ];
    #[allow(clippy::unnecessary_cast)]
    let t = st.f_type as i64;
    NETWORK.contains(&t) || NETWORK.contains(&(t & 0xFFFF_FFFF))
}

impl Hasher<'_> {
    /// Hash a file (its content digest) or a directory (its tree digest). A symlink given here
    /// is followed, as `b3sum` does; symlinks inside a directory are recorded, never followed.
    pub fn hash_path(&self, path: &Path) -> Result<Hashed, HashError> {
        let abs = std::path::absolute(path).map_err(io_err(path))?;
        let meta = fs::metadata(&abs).map_err(io_err(&abs))?;
        let walk = Walk {
            opts: self,
            stats: HashStats::default(),
            trees: Mutex::default(),
            files: Mutex::default(),
            clock_lag: Mutex::default(),
        };
        let (digest, is_dir) = if meta.is_dir() {
            (walk.dir(&abs)?, true)
        } else if meta.is_file() {
            let (d, _) = hash_file_stable(&abs, &meta)?;
            walk.stats.files.fetch_add(1, Ordering::Relaxed);
            walk.stats.bytes_read.fetch_add(meta.size(), Ordering::Relaxed);
            if self.collect {
                walk.files.lock().expect("files lock").push(HashedFile {
                    path: abs.clone(),
                    size: meta.size(),
                    executable: is_executable(&meta),
                    digest: d,
                });
            }
            (d, false)
        } else {
            return Err(unsupported(&abs, &meta));
        };
        Ok(Hashed {
            digest,
            is_dir,
            trees: walk.trees.into_inner().expect("trees lock"),
            files: walk.files.into_inner().expect("files lock"),
            stats: walk.stats,
        })
    }
}

enum Kind {
    File(fs::Metadata),
    Dir,
    Symlink,
}

impl Walk<'_> {
    fn dir(&self, dir: &Path) -> Result<Digest, HashError> {
        let mut children = Vec::new();
        for e in fs::read_dir(dir).map_err(io_err(dir))? {
            let e = e.map_err(io_err(dir))?;
            let path = e.path();
            let meta = fs::symlink_metadata(&path).map_err(io_err(&path))?;
            let ft = meta.file_type();
            let kind = if ft.is_file() {
                Kind::File(meta)
            } else if ft.is_dir() {
                Kind::Dir
            } else if ft.is_symlink() {
                Kind::Symlink
            } else {
                return Err(unsupported(&path, &meta));
            };
            children.push((e.file_name().as_bytes().to_vec(), path, kind));
        }
        let cached = self.opts.cache.load(dir);
        // Taken before any file is read: a write during the read is then newer than it.
        let now = self.now_for(dir);
        type Child = (Vec<u8>, Entry, Option<FileStat>);
        let results: Vec<Result<Child, HashError>> = children
            .into_par_iter()
            .map(|(name, path, kind)| match kind {
                Kind::Dir => Ok((name, Entry::Dir { digest: self.dir(&path)? }, None)),
                Kind::Symlink => {
                    let target = fs::read_link(&path).map_err(io_err(&path))?;
                    Ok((name, Entry::Symlink { target: target.into_os_string().as_bytes().to_vec() }, None))
                }
                Kind::File(meta) => {
                    let hit = cached.as_ref().and_then(|c| c.get(&name)).filter(|s| s.still_valid(&meta));
                    let stat = match hit {
                        Some(s) => {
                            self.stats.bytes_cached.fetch_add(s.size, Ordering::Relaxed);
                            s.clone()
                        }
                        None => {
                            let (digest, meta) = hash_file_stable(&path, &meta)?;
                            self.stats.bytes_read.fetch_add(meta.size(), Ordering::Relaxed);
                            FileStat::from_meta(name.clone(), &meta, digest, now)
                        }
                    };
                    self.stats.files.fetch_add(1, Ordering::Relaxed);
                    self.opts.progress.files_done(1, stat.size);
                    if self.opts.collect {
                        self.files.lock().expect("files lock").push(HashedFile {
                            path,
                            size: stat.size,
                            executable: stat.executable,
                            digest: stat.digest,
                        });
                    }
                    let entry = Entry::File { size: stat.size, executable: stat.executable, digest: stat.digest };
                    Ok((name, entry, Some(stat)))
                }
            })
            .collect();
        let mut tree = Tree::new();
        let mut record = DirRecord::default();
        for r in results {
            let (name, entry, stat) = r?;
            if let Some(s) = stat {
                record.files.push(s);
            }
            tree.insert(name.clone(), entry).map_err(|_| HashError::Io {
                path: dir.join(OsStr::from_bytes(&name)),
                source: io::Error::new(io::ErrorKind::InvalidData, "name not allowed in a tree"),
            })?;
        }
        record.files.sort_by(|a, b| a.name.cmp(&b.name));
        if cached.as_ref() != Some(&record) {
            self.opts.cache.save(dir, &record);
        }
        self.stats.dirs.fetch_add(1, Ordering::Relaxed);
        let bytes = tree.encode();
        let digest = Tree::digest_of_encoding(&bytes);
        if self.opts.collect {
            self.trees.lock().expect("trees lock").push((digest, bytes));
        }
        Ok(digest)
    }
}

fn unsupported(path: &Path, meta: &fs::Metadata) -> HashError {
    use std::os::unix::fs::FileTypeExt;
    let ft = meta.file_type();
    let kind = if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_char_device() {
        "character device"
    } else {
        "special file"
    };
    HashError::Unsupported { path: path.to_path_buf(), kind }
}

/// The executable bit kliko records: the owner's execute permission, as git does.
pub fn is_executable(m: &fs::Metadata) -> bool {
    m.mode() & 0o100 != 0
}

pub fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

/// Hash one regular file; re-hash if it changed while being read (size, mtime or ctime moved).
/// Returns the digest and the metadata it is valid for.
pub fn hash_file_stable(path: &Path, before: &fs::Metadata) -> Result<(Digest, fs::Metadata), HashError> {
    let mut before = before.clone();
    for _ in 0..3 {
        let file = fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path).map_err(io_err(path))?;
        let digest = hash_open_file(&file, before.size()).map_err(io_err(path))?;
        let after = file.metadata().map_err(io_err(path))?;
        if same_version(&before, &after) {
            return Ok((digest, after));
        }
        before = after;
    }
    Err(HashError::Unstable { path: path.to_path_buf() })
}

fn same_version(a: &fs::Metadata, b: &fs::Metadata) -> bool {
    a.size() == b.size()
        && a.mtime() == b.mtime()
        && a.mtime_nsec() == b.mtime_nsec()
        && a.ctime() == b.ctime()
        && a.ctime_nsec() == b.ctime_nsec()
        && a.ino() == b.ino()
}

/// Hash the content of an open file.
pub fn hash_open_file(file: &fs::File, size_hint: u64) -> io::Result<Digest> {
    let mut h = blake3::Hasher::new();
    if size_hint >= MMAP_THRESHOLD {
        // SAFETY: the map is read-only; a file truncated under us may raise SIGBUS, as with
        // b3sum. A concurrent change is caught by the re-check in `hash_file_stable`.
        if let Ok(map) = unsafe { memmap2::Mmap::map(file) } {
            h.update_rayon(&map);
            return Ok(h.finalize().into());
        }
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut f = file;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}
