//! A process-wide request to stop, set when the operator interrupts (SIGINT, SIGTERM): long
//! operations check it between steps and end with [`EngineError::Interrupted`], after which
//! their caller releases the lock and exits. Nothing is left half-done that the write ordering
//! does not already cover: a backup writes no snapshot after a stop, prune stops between steps
//! that are each safe to stop after.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{EngineError, Result};

static STOP: AtomicBool = AtomicBool::new(false);

/// Asks every operation of this process to stop at its next check.
pub fn request_stop() {
    STOP.store(true, Ordering::Release);
}

/// Whether a stop was requested.
pub fn stop_requested() -> bool {
    STOP.load(Ordering::Acquire)
}

/// Fails with [`EngineError::Interrupted`] once a stop was requested.
pub fn check() -> Result<()> {
    if stop_requested() {
        return Err(EngineError::Interrupted);
    }
    Ok(())
}
