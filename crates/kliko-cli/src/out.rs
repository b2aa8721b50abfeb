//! Standard output and error that never panic.
//!
//! std's `println!` panics ("failed printing to stdout: Broken pipe") when the reader has gone,
//! as in `kliko cache history | head`. The crate's `println!`, `print!` and `eprintln!` (defined
//! in `main.rs`, shadowing std's) write here instead. Once stdout is closed, later output is
//! dropped and the command goes on to its normal end: a run still finishes, stores its result
//! and removes its container, so a closed pipe never leaves work half done. `main` then exits
//! with the command's own code and says nothing about the pipe, as ripgrep and git do. Any
//! other write error (a full disk under `> file`) is reported once, at the end, and the exit
//! code is 2: output that was lost must not look complete.
//!
//! Resetting SIGPIPE to its default action (what many C tools rely on) was not chosen: the
//! signal would kill kliko at the first write, possibly while a container runs and before it
//! is stopped, removed and its lease released.

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);
static STDOUT_ERROR: Mutex<Option<io::Error>> = Mutex::new(None);

/// Writes to stdout (`newline` appended), remembering instead of panicking on an error.
pub fn stdout(args: fmt::Arguments<'_>, newline: bool) {
    if stdout_closed() {
        return;
    }
    let mut o = io::stdout().lock();
    let r = o.write_fmt(args).and_then(|()| if newline { o.write_all(b"\n") } else { Ok(()) });
    if let Err(e) = r {
        failed(e);
    }
}

/// Writes to stderr; an error is ignored (there is nowhere left to report it).
pub fn stderr(args: fmt::Arguments<'_>, newline: bool) {
    let mut e = io::stderr().lock();
    let _ = e.write_fmt(args).and_then(|()| if newline { e.write_all(b"\n") } else { Ok(()) });
}

/// Whether stdout failed (its reader gone, or another error): nothing more is written to it.
/// Commands that would go on producing output for nobody may stop early.
pub fn stdout_closed() -> bool {
    STDOUT_CLOSED.load(Ordering::Relaxed)
}

/// Records a failed write to stdout made some other way (clap's help, say).
pub fn failed(e: io::Error) {
    STDOUT_CLOSED.store(true, Ordering::Relaxed);
    if e.kind() != io::ErrorKind::BrokenPipe {
        let mut slot = STDOUT_ERROR.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(e);
    }
}

/// At the end of the process: flushes stdout and returns the first write error that was not
/// a closed pipe.
pub fn finish() -> Result<(), io::Error> {
    if !stdout_closed() {
        if let Err(e) = io::stdout().lock().flush() {
            failed(e);
        }
    }
    match STDOUT_ERROR.lock().unwrap_or_else(|p| p.into_inner()).take() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
