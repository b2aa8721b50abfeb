//! Where a command's time goes: with `KLIKO_TRACE=1` in the environment, each [`mark`] prints
//! `kliko-trace: +12.3 ms (Δ 4.1 ms) what` to standard error, timed from the first mark (or
//! [`start`]). Off by default, when a mark costs one relaxed atomic load.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

static STATE: AtomicU8 = AtomicU8::new(0); // 0 unknown, 1 off, 2 on
static CLOCK: OnceLock<Mutex<(Instant, Instant)>> = OnceLock::new();

fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => {
            let on = std::env::var_os("KLIKO_TRACE").is_some_and(|v| !v.is_empty() && v != "0");
            STATE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
    }
}

/// Start the clock (call first thing in `main`); later marks are timed from here.
pub fn start() {
    if enabled() {
        let now = Instant::now();
        let _ = CLOCK.set(Mutex::new((now, now)));
    }
}

/// Print how long since the start and since the previous mark, if tracing is on.
pub fn mark(what: &str) {
    if !enabled() {
        return;
    }
    let now = Instant::now();
    let clock = CLOCK.get_or_init(|| Mutex::new((now, now)));
    let mut c = clock.lock().unwrap_or_else(|e| e.into_inner());
    let (since_start, since_last) = (now - c.0, now - c.1);
    c.1 = now;
    eprintln!(
        "kliko-trace: +{:.1} ms (Δ {:.1} ms) {what}",
        since_start.as_secs_f64() * 1e3,
        since_last.as_secs_f64() * 1e3
    );
}
