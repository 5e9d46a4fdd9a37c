//! SIGINT and SIGTERM. The first asks the running operation to stop: it ends at its next safe
//! point, its lock and temporary objects are released as on any error, and sbk exits with 130
//! or 143 (128 + the signal). A second one ends the process at once. A lock on shared storage
//! from another host can only expire by its lease, so the clean stop is what keeps it from
//! blocking everyone for half an hour.

use std::sync::atomic::{AtomicI32, Ordering};

use signal_hook::consts::{SIGINT, SIGTERM};

static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// Starts the thread that watches for the signals (once, at startup).
pub fn install() {
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
        return; // without it, the signals keep their default action
    };
    let _ = std::thread::Builder::new()
        .name("sbk-signals".into())
        .spawn(move || {
            for s in signals.forever() {
                if RECEIVED.swap(s, Ordering::AcqRel) != 0 {
                    eprintln!("sbk: stopping at once (second signal)");
                    std::process::exit(128 + s);
                }
                sbk_engine::request_stop();
            }
        });
}

/// The signal that asked for a stop, if one did.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::Acquire) {
        0 => None,
        s => Some(s),
    }
}

/// The signal's name, for messages.
pub fn name(s: i32) -> &'static str {
    match s {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}
