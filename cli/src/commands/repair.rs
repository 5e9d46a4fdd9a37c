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
    /// The index is a cache: every pack describes its own blobs, so nothing is lost. Takes an
    /// exclusive lock. Packs that cannot be read are reported (exit code 12) and left alone.
    Index,
}

/// Runs `sbk repair`.
pub fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let What::Index = args.what;
    let (repo, _lock) = ctx.open_locked(LockKind::Exclusive, "repair index")?;
    let report = repo.rebuild_index()?;
    // Other index slots are caches of other processes, none of which runs now (we hold the
    // exclusive lock): drop them rather than trust them; they are rebuilt when next needed.
    for slot in sbk_store::Index::slots(&repo.path().join("index"))? {
        if slot != repo.index().path() {
            std::fs::remove_dir_all(&slot)
                .map_err(|e| anyhow::anyhow!("{}: {e}", slot.display()))?;
        }
    }
    for (path, why) in &report.damaged {
        eprintln!("sbk: problem: {}: {why}", path.display());
    }
    ctx.out.info(
        &format!(
            "rebuilt the index from {} packs: {} blobs; {} damaged packs skipped",
            report.packs,
            report.blobs,
            report.damaged.len()
        ),
        false,
    );
    ctx.out.json(
        &serde_json::json!({
            "packs": report.packs,
            "blobs": report.blobs,
            "damaged": report.damaged.iter().map(|(p, why)| serde_json::json!({"pack": p, "problem": why})).collect::<Vec<_>>(),
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
