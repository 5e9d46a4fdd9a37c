//! `sbk snapshots`: list snapshots.

use sbk_records::time;
use std::process::ExitCode;

use anyhow::Result;

use super::Context;
use crate::exit::Exit;
use crate::output::bytes;

/// List the snapshots in the repository, oldest first.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// The storage's time now (this host's, for storage that does not say).
pub fn storage_now(repo: &sbk_store::Repository) -> i64 {
    match repo.backend().versions() {
        Some(v) => v.storage_now(),
        None => sbk_store::unix_now(),
    }
}

/// Runs `sbk snapshots`.
pub fn run(ctx: &Context, _args: Args) -> Result<ExitCode> {
    let repo = ctx.open_repo()?;
    let all = repo.snapshots()?;
    let now = storage_now(&repo);
    let mut json = Vec::new();
    let mut damaged = false;
    if !all.is_empty() {
        ctx.out.info(
            &format!(
                "{:<8}  {:<20}  {:<12}  {:>10}  {}",
                "ID", "TIME", "HOST", "SIZE", "SOURCE [TAGS]"
            ),
            false,
        );
    }
    for (id, m) in &all {
        match m {
            Ok(m) => {
                let tags = if m.tags.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", m.tags.join(", "))
                };
                let cbt = m.changed_blocks().and_then(|r| r.ok());
                let tags = match &cbt {
                    Some(c) if c.incremental && c.trusted => format!(
                        "{tags} (incremental: {} of {} segments read)",
                        c.segments_read,
                        c.segments_read + c.segments_reused
                    ),
                    Some(c) if c.incremental => {
                        format!("{tags} (changed-block list was wrong: read in full)")
                    }
                    _ => tags,
                };
                let protected = repo.protected_until(m, now);
                let tags = match protected {
                    Some(until) if until > now => {
                        format!("{tags} (protected until {})", time(until * 1_000_000_000))
                    }
                    _ => tags,
                };
                ctx.out.info(
                    &format!(
                        "{:<8}  {:<20}  {:<12}  {:>10}  {}{}",
                        &id.to_hex()[..8],
                        time(m.time_ns),
                        m.host,
                        bytes(m.size),
                        m.source,
                        tags
                    ),
                    false,
                );
                json.push(serde_json::json!({
                    "id": id.to_hex(),
                    "time": time(m.time_ns),
                    "host": m.host,
                    "source": m.source,
                    "size": m.size,
                    "tags": m.tags,
                    "parent": m.parent.map(|p| p.to_hex()),
                    "changed_blocks": cbt.as_ref().map(crate::output::changed_blocks_json),
                    "protected_until": protected.map(|t| time(t * 1_000_000_000)),
                }));
            }
            Err(e) => {
                damaged = true;
                ctx.out
                    .notice(&format!("snapshot {id} cannot be read: {e}"));
                json.push(serde_json::json!({ "id": id.to_hex(), "error": e.to_string() }));
            }
        }
    }
    ctx.out.info(
        &format!(
            "{} snapshot{}",
            all.len(),
            if all.len() == 1 { "" } else { "s" }
        ),
        false,
    );
    ctx.out.json(&serde_json::Value::Array(json), false);
    Ok(if damaged { Exit::Damaged } else { Exit::Ok }.into())
}
