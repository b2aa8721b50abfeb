//! The store's one file-lock type: whole-file advisory locks (`flock(2)` on Linux, through
//! std's `File::lock`), which the kernel releases when their holder dies, however it dies
//! (on NFSv4, the server releases them when the client's lease expires). `cache-format.md`
//! names every lock file and who takes it how.

use std::fs::{File, TryLockError};
use std::io;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Any number of holders at once (`LOCK_SH`).
    Shared,
    /// One holder, and no shared ones (`LOCK_EX`).
    Exclusive,
}

/// Wait until `file` is locked in `mode`.
pub(crate) fn lock(file: &File, mode: Mode) -> io::Result<()> {
    loop {
        let locked = match mode {
            Mode::Shared => file.lock_shared(),
            Mode::Exclusive => file.lock(),
        };
        match locked {
            // A signal handler ran while we waited: wait again.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Lock `file` in `mode` if nobody holds a conflicting lock: `Ok(true)` when it is now
/// locked, `Ok(false)` when another holder has it.
pub(crate) fn try_lock(file: &File, mode: Mode) -> io::Result<bool> {
    let locked = match mode {
        Mode::Shared => file.try_lock_shared(),
        Mode::Exclusive => file.try_lock(),
    };
    match locked {
        Ok(()) => Ok(true),
        Err(TryLockError::WouldBlock) => Ok(false),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_excludes_and_shared_shares() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let open = || File::options().create(true).truncate(false).read(true).write(true).open(&path).unwrap();
        let (a, b, c) = (open(), open(), open());
        lock(&a, Mode::Shared).unwrap();
        assert!(try_lock(&b, Mode::Shared).unwrap(), "shared locks share");
        assert!(!try_lock(&c, Mode::Exclusive).unwrap(), "an exclusive lock waits for shared ones");
        drop((a, b));
        assert!(try_lock(&c, Mode::Exclusive).unwrap(), "closing a file releases its lock");
        let d = open();
        assert!(!try_lock(&d, Mode::Shared).unwrap());
        assert!(!try_lock(&d, Mode::Exclusive).unwrap());
    }
}
