//! `sbk copy`: replicate snapshots to another repository.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use sbk_store::LockKind;

use super::Context;
use crate::output::bytes;

/// Copy snapshots from another repository into this one (--repo), for the 3-2-1 rule.
///
/// Only the chunks this repository lacks are stored, re-encrypted under its key; every chunk read
/// from the source is verified. Chunk ids are keyed per repository, so each chunk of a copied
/// snapshot is read from the source to learn its id here (unless both share their chunk-id key).
/// A copy records its origin (the source repository and snapshot), and a snapshot copied before
/// is skipped: running copy again copies only what is new. Packs and their index are durable
/// before the copy's manifest is written, as in backup.
///
/// The source's password: SBK_FROM_PASSWORD, --from-password-file or --from-password-command;
/// when none is given, the same as this repository's.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The repository to copy from: a directory or s3://BUCKET/PREFIX.
    #[arg(long, value_name = "DIR|s3://BUCKET/PREFIX")]
    from_repo: PathBuf,

    /// Snapshots to copy (ids, unique prefixes, `latest`) [default: all, filtered by --host and
    /// --tag].
    #[arg(value_name = "SNAPSHOT")]
    snapshots: Vec<String>,

    /// Copy only snapshots of this host.
    #[arg(long, value_name = "HOST", value_parser = crate::names::parse)]
    host: Option<String>,

    /// Copy only snapshots with this tag.
    #[arg(long, value_name = "TAG", value_parser = crate::names::parse)]
    tag: Option<String>,

    /// Copy from the source repository as it was at TIME (RFC 3339, or a duration ago such as
    /// 2d), through its object versions: the way to rebuild a clean repository elsewhere from
    /// one a stolen mover damaged (S3 with Object Lock). Nothing is written to the source.
    #[arg(long, value_name = "TIME", value_parser = super::parse_as_of)]
    from_as_of: Option<super::AsOf>,

    #[command(flatten)]
    from: super::FromPassword,
}

/// Runs `sbk copy`.
pub fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let src = ctx.open_other_as_of(&args.from_repo, &args.from, args.from_as_of.as_ref())?;
    let _src_lock = ctx.lock(&src, LockKind::Shared, "copy (source)")?;
    if args.from_as_of.is_some() {
        // A view of the past: its index goes into a temporary cache, never over the cache of
        // the repository as it is now.
        src.load_index(&sbk_store::CacheLocation::Temporary)?;
    } else {
        ctx.load_index(&src)?;
    }
    let (dst, _dst_lock) = ctx.open_locked(LockKind::Shared, "copy", true)?;
    sbk_engine::check_compatible(&src, &dst)?;
    let ids = if args.snapshots.is_empty() {
        src.snapshots()?
            .into_iter()
            .filter_map(|(id, m)| m.ok().map(|m| (id, m)))
            .filter(|(_, m)| args.host.as_ref().is_none_or(|h| *h == m.host))
            .filter(|(_, m)| args.tag.as_ref().is_none_or(|t| m.tags.contains(t)))
            .map(|(id, _)| id)
            .collect()
    } else {
        args.snapshots
            .iter()
            .map(|s| src.resolve_snapshot(s))
            .collect::<Result<Vec<_>, _>>()?
    };
    let outcomes = sbk_engine::copy(&src, &dst, &ids, ctx.threads)?;
    let mut json = Vec::new();
    for o in &outcomes {
        let line = match (&o.copy, &o.existing) {
            (Some(c), _) => format!(
                "copied snapshot {} as {}: {} chunks read, {} new here, {} stored",
                &o.source.to_hex()[..8],
                &c.to_hex()[..8],
                o.chunks_read,
                o.chunks_written,
                bytes(o.bytes_written)
            ),
            (None, Some(e)) => format!(
                "snapshot {} was copied before (as {}): skipped",
                &o.source.to_hex()[..8],
                &e.to_hex()[..8]
            ),
            (None, None) => unreachable!("a copy or an earlier one"),
        };
        ctx.out.info(&line, false);
        json.push(serde_json::json!({
            "source": o.source.to_hex(),
            "copy": o.copy.map(|c| c.to_hex()),
            "existing": o.existing.map(|c| c.to_hex()),
            "chunks_read": o.chunks_read,
            "chunks_written": o.chunks_written,
            "bytes_written": o.bytes_written,
        }));
    }
    ctx.out.json(&serde_json::Value::Array(json), false);
    Ok(ExitCode::SUCCESS)
}
