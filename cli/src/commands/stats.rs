//! `sbk stats`: sizes and ratios.

use std::process::ExitCode;

use anyhow::Result;

use super::Context;
use crate::exit::Exit;
use crate::output::bytes;

/// Show logical and stored sizes, dedup and compression ratios, for the repository and per
/// snapshot, including the bytes unique to each snapshot (what forgetting it would free).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Only these snapshots (all when none are given).
    #[arg(value_name = "SNAPSHOT")]
    snapshots: Vec<String>,
}

/// Runs `sbk stats`.
pub fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let (repo, _lock) = ctx.open_locked(sbk_store::LockKind::Shared, "stats", true)?;
    let selected = args
        .snapshots
        .iter()
        .map(|s| repo.resolve_snapshot(s))
        .collect::<Result<Vec<_>, _>>()?;
    let (r, per) = sbk_engine::stats(&repo, &selected)?;
    for s in &per {
        let how = match &s.incremental {
            Some(c) => format!(
                "; incremental: {} of {} segments read{}",
                c.segments_read,
                c.segments_read + c.segments_reused,
                if c.trusted {
                    ""
                } else {
                    " (list was wrong: read in full)"
                }
            ),
            None => String::new(),
        };
        ctx.out.info(
            &format!(
                "{}  size {}, data {}, {} chunks ({}), unique to it {} ({} stored){how}",
                &s.id.to_hex()[..8],
                bytes(s.size),
                bytes(s.data_bytes),
                s.chunks,
                bytes(s.chunk_bytes),
                bytes(s.unique_bytes),
                bytes(s.unique_stored)
            ),
            false,
        );
    }
    ctx.out.info(
        &format!(
            "{} snapshots: logical {}, data {}, distinct chunks {} ({}), stored {}; dedup {:.2}x, compression {:.2}x; packs on disk {}",
            r.snapshots,
            bytes(r.logical),
            bytes(r.data_bytes),
            r.chunks,
            bytes(r.chunk_bytes),
            bytes(r.stored_bytes),
            r.dedup_ratio(),
            r.compression_ratio(),
            bytes(r.pack_bytes)
        ),
        false,
    );
    ctx.out.json(
        &serde_json::json!({
            "snapshots": r.snapshots,
            "logical_bytes": r.logical,
            "data_bytes": r.data_bytes,
            "chunks": r.chunks,
            "chunk_bytes": r.chunk_bytes,
            "stored_bytes": r.stored_bytes,
            "pack_bytes": r.pack_bytes,
            "dedup_ratio": r.dedup_ratio(),
            "compression_ratio": r.compression_ratio(),
            "per_snapshot": per.iter().map(|s| serde_json::json!({
                "snapshot": s.id.to_hex(),
                "size": s.size,
                "data_bytes": s.data_bytes,
                "chunks": s.chunks,
                "chunk_bytes": s.chunk_bytes,
                "unique_bytes": s.unique_bytes,
                "unique_stored_bytes": s.unique_stored,
                "incremental": s.incremental.as_ref().map(crate::output::changed_blocks_json),
            })).collect::<Vec<_>>(),
        }),
        false,
    );
    Ok(Exit::Ok.into())
}
