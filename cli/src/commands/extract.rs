//! `sbk extract`: files and directory trees out of a snapshot's filesystems.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Result;
use sbk_engine::{extract, parse_part_path, ExtractOptions, ExtractReport};

use super::files::open;
use super::Context;
use crate::exit::{Exit, ExitWith};
use crate::output::bytes;

/// Restore files and directory trees from a snapshot, without restoring the disk.
///
/// Each PART:PATH is written under --target by its last component (`1:/etc` writes
/// `DIR/etc`; `1:/` writes the partition's root directory's entries into DIR): contents (sparse
/// where the file is), directories, symbolic links, hard links, modes, modification times,
/// extended attributes, and owners when run as root. Nothing is written outside DIR and no
/// symbolic link inside it is followed. A name already in DIR is refused (exit 13) unless
/// --force replaces it.
///
/// Only the filesystem's metadata and the files' own chunks are read, each verified. A file
/// with a damaged chunk fails with a message naming it and the chunk, the rest go on, and sbk
/// exits 12.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Snapshot: a full id, a unique prefix of one, or `latest`.
    #[arg(value_name = "SNAPSHOT")]
    snapshot: String,

    /// What to restore: `1:/etc/nginx`, `2:/Users/ann/report.xlsx`, `1:/` for a whole partition.
    #[arg(value_name = "PART:PATH", required = true)]
    paths: Vec<String>,

    /// The directory to write into (made if missing).
    #[arg(long, short = 't', value_name = "DIR")]
    target: PathBuf,

    /// Replace what is already in DIR under the names being written.
    #[arg(long, short = 'f')]
    force: bool,
}

/// Runs `sbk extract`.
pub fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let wanted = args
        .paths
        .iter()
        .map(|p| parse_part_path(p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ExitWith(Exit::Usage, e))?;
    let start = Instant::now();
    let opened = open(ctx, &args.snapshot, "extract")?;
    let opts = ExtractOptions {
        force: args.force,
        owners: rustix::process::geteuid().is_root(),
    };
    let mut report = ExtractReport::default();
    for (part, path) in &wanted {
        let fs = opened.files.filesystem(*part)?;
        extract(fs.as_ref(), path, &args.target, &opts, &mut report)?;
    }
    for f in &report.failed {
        ctx.out.notice(&format!("not extracted: {f}"));
    }
    for s in &report.skipped {
        ctx.out.notice(&format!("left out: {s}"));
    }
    let ms = start.elapsed().as_millis() as u64;
    ctx.out.info(
        &format!(
            "extracted {} files ({}), {} directories, {} symbolic links, {} hard links, {} special files to {} in {:.1} s, reading {} from the repository{}",
            report.files,
            bytes(report.bytes),
            report.dirs,
            report.symlinks,
            report.hard_links,
            report.specials,
            args.target.display(),
            ms as f64 / 1000.0,
            bytes(opened.count.bytes()),
            if report.failed.is_empty() {
                String::new()
            } else {
                format!("; {} failed (see above)", report.failed.len())
            }
        ),
        false,
    );
    let mut json = serde_json::to_value(&report)?;
    json["snapshot"] = opened.id.to_hex().into();
    json["target"] = serde_json::json!(args.target);
    json["duration_ms"] = ms.into();
    json["repository_bytes_read"] = opened.count.bytes().into();
    json["repository_reads"] = opened.count.requests().into();
    ctx.out.json(&json, false);
    Ok(if report.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        Exit::Damaged.into()
    })
}
