//! `sbk diff`: where two snapshots differ, from their segment trees.

use std::process::ExitCode;

use anyhow::Result;
use sbk_store::LockKind;

use super::Context;
use crate::output::bytes;

/// Show the byte ranges where two snapshots differ, without reading their data.
///
/// Segments with the same tree are the same; elsewhere the chunks are compared by id and offset,
/// so the ranges are at chunk granularity (a superset of the bytes that changed). A grown or
/// shrunk source differs in its tail. The output is `OFFSET LENGTH` lines, the changed-block
/// list format `sbk backup --changed-blocks` reads: use it to check a storage-side list, or to
/// size a replication. A summary goes to stderr; `--json` prints the ranges as JSON.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The older snapshot: a full id, a unique prefix, or `latest`.
    #[arg(value_name = "SNAPSHOT_A")]
    a: String,
    /// The newer snapshot.
    #[arg(value_name = "SNAPSHOT_B")]
    b: String,
}

/// Runs `sbk diff`.
pub fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let (repo, _lock) = ctx.open_locked(LockKind::Shared, "diff", true)?;
    let (a, b) = (
        repo.resolve_snapshot(&args.a)?,
        repo.resolve_snapshot(&args.b)?,
    );
    let d = sbk_engine::diff(&repo, &a, &b)?;
    if !ctx.out.is_json() {
        let mut lines = String::new();
        for r in &d.ranges {
            lines.push_str(&format!("{} {}\n", r.start, r.end - r.start));
        }
        std::io::Write::write_all(&mut std::io::stdout(), lines.as_bytes())?;
    }
    ctx.out.info(
        &format!(
            "{} and {}: {} in {} ranges differ ({} segments compared by chunk){}",
            &a.to_hex()[..8],
            &b.to_hex()[..8],
            bytes(d.bytes()),
            d.ranges.len(),
            d.segments_compared,
            if d.size_a != d.size_b {
                format!("; sizes {} and {}", bytes(d.size_a), bytes(d.size_b))
            } else {
                String::new()
            }
        ),
        true,
    );
    ctx.out.json(
        &serde_json::json!({
            "a": a.to_hex(),
            "b": b.to_hex(),
            "size_a": d.size_a,
            "size_b": d.size_b,
            "bytes": d.bytes(),
            "segments_compared": d.segments_compared,
            "ranges": d.ranges.iter().map(|r| serde_json::json!({"offset": r.start, "length": r.end - r.start})).collect::<Vec<_>>(),
        }),
        false,
    );
    Ok(ExitCode::SUCCESS)
}
