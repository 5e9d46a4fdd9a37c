//! `sbk unlock`: remove stale locks.

use std::process::ExitCode;

use anyhow::Result;
use sbk_store::{list_locks, Kind, StoreError};

use super::Context;
use crate::exit::Exit;

/// Remove stale locks: those of processes that no longer exist on this host, those not
/// refreshed within their lease (30 minutes by default), and unreadable lock files. Live locks are listed
/// and kept.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `sbk unlock`.
pub fn run(ctx: &Context, _args: Args) -> Result<ExitCode> {
    // Needs only the lock objects: no password, no index, no cache; the config only to know
    // that a repository is there and of a format this sbk reads.
    let backend = ctx.backend()?;
    sbk_store::Repository::read_config(backend.as_ref())?;
    let host = sbk_store::holder_id();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (mut removed, mut kept) = (Vec::new(), Vec::new());
    for lock in list_locks(backend.as_ref())? {
        let why = match &lock.info {
            Ok(info) => info.stale(&host, now),
            Err(e) => Some(format!("unreadable lock file: {e}")),
        };
        match why {
            Some(why) => {
                // The pins of a stale server lock go with it (prune removes them too).
                sbk_store::remove_pins(backend.as_ref(), &lock.name);
                match backend.delete(Kind::Lock, &lock.name) {
                    Ok(()) | Err(StoreError::ObjectMissing { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
                ctx.out
                    .info(&format!("removed stale lock {}: {why}", lock.name), false);
                removed.push(serde_json::json!({"lock": lock.name, "reason": why}));
            }
            None => {
                let info = lock.info.as_ref().expect("a live lock decoded");
                ctx.out.info(
                    &format!(
                        "kept live lock {}: process {} on {} ({})",
                        lock.name, info.pid, info.host, info.purpose
                    ),
                    false,
                );
                kept.push(serde_json::json!({"lock": lock.name, "pid": info.pid, "host": info.host, "purpose": info.purpose}));
            }
        }
    }
    ctx.out.json(
        &serde_json::json!({"removed": removed, "kept": kept}),
        false,
    );
    Ok(Exit::Ok.into())
}
