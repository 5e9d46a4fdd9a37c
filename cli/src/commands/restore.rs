//! `sbk restore`: restore a snapshot to a file, a block device or stdout.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use sbk_engine::{RestoreOptions, RestoreTarget};
use sbk_store::LockKind;

use super::Context;
use crate::exit::Exit;
use crate::output::{bytes, rate, rate_num};

/// Restore a snapshot to a file, a block device, or `-` (stdout).
///
/// Every chunk is verified against its id before it is written; a damaged chunk stops the
/// restore with an error naming the chunk and its pack. A file target is written under a
/// temporary name and renamed into place when complete (zero runs become holes); a device
/// target must be at least as large as the snapshot.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Snapshot: a full id, a unique prefix of one, or `latest`.
    #[arg(value_name = "SNAPSHOT")]
    snapshot: String,

    /// Where to restore: a file path, a block device, or `-` for stdout.
    #[arg(value_name = "TARGET")]
    target: PathBuf,

    /// Overwrite a non-empty file or a block device.
    #[arg(long, short = 'f')]
    force: bool,
}

/// Runs `sbk restore`.
pub fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let (repo, _lock) = ctx.open_locked(LockKind::Shared, "restore", true)?;
    let id = repo.resolve_snapshot(&args.snapshot)?;
    let to_stdout = args.target.as_os_str() == "-";
    let target = if to_stdout {
        RestoreTarget::Stdout
    } else {
        RestoreTarget::Path(args.target.clone())
    };
    let progress = ctx.out.progress();
    let stats = sbk_engine::restore(
        &repo,
        &id,
        &target,
        &RestoreOptions {
            threads: ctx.threads,
            force: args.force,
        },
        &progress,
    )?;
    ctx.out.info(
        &format!(
            "restored snapshot {} to {}: {} ({} data, {} zero) from {} chunk reads, {} in {:.1} s",
            &id.to_hex()[..8],
            args.target.display(),
            bytes(stats.size),
            bytes(stats.data_bytes),
            bytes(stats.zero_bytes),
            stats.chunks,
            rate(stats.size, stats.duration_ms),
            stats.duration_ms as f64 / 1000.0
        ),
        to_stdout,
    );
    ctx.out.json(
        &serde_json::json!({
            "snapshot": id.to_hex(),
            "target": args.target,
            "size": stats.size,
            "data_bytes": stats.data_bytes,
            "zero_bytes": stats.zero_bytes,
            "chunks": stats.chunks,
            "duration_ms": stats.duration_ms,
            "throughput_bytes_per_sec": rate_num(stats.size, stats.duration_ms),
            "direct_io": stats.direct_io,
        }),
        to_stdout,
    );
    Ok(Exit::Ok.into())
}
