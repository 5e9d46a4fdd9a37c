//! `sbk unlock`: remove stale locks.

use std::process::ExitCode;

use anyhow::Result;

use super::Context;
use crate::exit::Exit;

/// Remove stale locks: those of processes that no longer exist on this host, those the storage
/// has not seen refreshed within their lease (30 minutes by default; judged by the storage's
/// clock, never this host's), and unreadable lock files. Live locks are listed and kept.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `sbk unlock`.
pub fn run(ctx: &Context, _args: Args) -> Result<ExitCode> {
    let (mut removed, mut kept) = (Vec::new(), Vec::new());
    for v in sbk_engine::unlock(ctx.backend()?.as_ref())? {
        let rule = v.liveness.to_string();
        if v.removed {
            ctx.out
                .info(&format!("removed stale lock {}: {rule}", v.name), false);
            removed.push(serde_json::json!({"lock": v.name, "reason": rule}));
            continue;
        }
        let (pid, host, purpose) = v
            .info
            .as_ref()
            .map(|i| (i.pid, i.host.as_str(), i.purpose.as_str()))
            .unwrap_or((0, "?", "?"));
        ctx.out.info(
            &format!(
                "kept live lock {}: process {pid} on {host} ({purpose}): {rule}",
                v.name
            ),
            false,
        );
        kept.push(serde_json::json!({"lock": v.name, "pid": pid, "host": host, "purpose": purpose, "reason": rule}));
    }
    ctx.out.json(
        &serde_json::json!({"removed": removed, "kept": kept}),
        false,
    );
    Ok(Exit::Ok.into())
}
