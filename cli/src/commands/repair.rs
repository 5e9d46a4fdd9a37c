//! `sbk repair index`: rebuild the index from the packs.

use std::process::ExitCode;

use anyhow::Result;
use sbk_store::LockKind;

use super::Context;
use crate::exit::Exit;

/// Repair the repository.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(clap::Subcommand, Debug)]
enum What {
    /// Rebuild the index from the pack trailers (after it was deleted or damaged).
    ///
    /// Every pack describes its own blobs in its trailer, so nothing is lost: new index files
    /// are written from the trailers, then the old ones are removed. Needs only the packs (no
    /// cache). Takes an exclusive lock. Packs that cannot be read are reported (exit code 12)
    /// and left alone.
    Index,
}

/// Runs `sbk repair`.
pub fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let What::Index = args.what;
    // Needs only the packs: no index, no cache.
    let (repo, _lock) = ctx.open_locked(LockKind::Exclusive, "repair index", false)?;
    let report = sbk_engine::repair_index(&repo, ctx.threads, &ctx.out.progress())?;
    for (pack, why) in &report.damaged {
        eprintln!("sbk: problem: pack {pack}: {why}");
    }
    ctx.out.info(
        &format!(
            "rebuilt the index from {} packs: {} blobs in {} index files ({} replaced); {} damaged packs skipped",
            report.packs,
            report.blobs,
            report.index_files_written,
            report.index_files_removed,
            report.damaged.len()
        ),
        false,
    );
    ctx.out.json(
        &serde_json::json!({
            "packs": report.packs,
            "blobs": report.blobs,
            "index_files_written": report.index_files_written,
            "index_files_removed": report.index_files_removed,
            "damaged": report.damaged.iter().map(|(p, why)| serde_json::json!({"pack": p.to_hex(), "problem": why})).collect::<Vec<_>>(),
        }),
        false,
    );
    Ok(if report.damaged.is_empty() {
        Exit::Ok
    } else {
        Exit::Damaged
    }
    .into())
}
