//! `sbk cat`: one file out of a snapshot's filesystem, to standard output.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Result;
use sbk_diskfs::Kind;
use sbk_engine::{parse_part_path, EngineError};

use super::files::open;
use super::Context;
use crate::exit::{Exit, ExitWith};

/// Write one file of a snapshot's filesystem to standard output.
///
/// PART:PATH names the file (`1:/etc/fstab`; symbolic links are followed inside the
/// filesystem). Only the chunks holding the filesystem's metadata on the way and the file's
/// own are read, each verified; a damaged one stops with an error naming it (exit 12).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Snapshot: a full id, a unique prefix of one, or `latest`.
    #[arg(value_name = "SNAPSHOT")]
    snapshot: String,

    /// The file: `1:/etc/fstab`.
    #[arg(value_name = "PART:PATH")]
    path: String,
}

/// Runs `sbk cat`.
pub fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let opened = open(ctx, &args.snapshot, "cat")?;
    let (part, path) = parse_part_path(&args.path).map_err(|e| ExitWith(Exit::Usage, e))?;
    let fs = opened.files.filesystem(part)?;
    let node = sbk_diskfs::lookup(fs.as_ref(), path.as_bytes(), true)
        .map_err(|e| EngineError::from_fs(&path, e))?;
    if node.kind != Kind::File {
        return Err(ExitWith(
            Exit::Refused,
            format!(
                "{path} is a {}, not a file: sbk ls lists it, sbk extract restores it",
                node.kind.name()
            ),
        )
        .into());
    }
    let data = fs.open(&node).map_err(|e| EngineError::from_fs(&path, e))?;
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let n = data
            .read_at(at, &mut buf)
            .map_err(|e| EngineError::from_fs(&path, e))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        at += n as u64;
    }
    out.flush()?;
    ctx.out.json(
        &serde_json::json!({
            "snapshot": opened.id.to_hex(),
            "path": args.path,
            "size": at,
            "repository_bytes_read": opened.count.bytes(),
        }),
        true,
    );
    Ok(ExitCode::SUCCESS)
}
