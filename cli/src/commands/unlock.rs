//! `sbk unlock`: remove stale locks.

use std::process::ExitCode;

use anyhow::Result;
use sbk_store::{host_name, list_locks};

use super::Context;
use crate::exit::Exit;

/// Remove stale locks: those of processes that no longer exist on this host, those not
/// refreshed within their lease (30 minutes), and unreadable lock files. Live locks are listed
/// and kept.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `sbk unlock`.
pub fn run(ctx: &Context, _args: Args) -> Result<ExitCode> {
    let repo = ctx.open_repo()?;
    let host = host_name();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (mut removed, mut kept) = (Vec::new(), Vec::new());
    for lock in list_locks(repo.path())? {
        let why = match &lock.info {
            Ok(info) => info.stale(&host, now),
            Err(e) => Some(format!("unreadable lock file: {e}")),
        };
        match why {
            Some(why) => {
                std::fs::remove_file(&lock.path)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", lock.path.display()))?;
                ctx.out.info(
                    &format!("removed stale lock {}: {why}", lock.path.display()),
                    false,
                );
                removed.push(serde_json::json!({"lock": lock.path, "reason": why}));
            }
            None => {
                let info = lock.info.as_ref().expect("a live lock decoded");
                ctx.out.info(
                    &format!(
                        "kept live lock {}: process {} on {} ({})",
                        lock.path.display(),
                        info.pid,
                        info.host,
                        info.purpose
                    ),
                    false,
                );
                kept.push(serde_json::json!({"lock": lock.path, "pid": info.pid, "host": info.host, "purpose": info.purpose}));
            }
        }
    }
    ctx.out.json(
        &serde_json::json!({"removed": removed, "kept": kept}),
        false,
    );
    Ok(Exit::Ok.into())
}
