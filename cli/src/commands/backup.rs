//! `sbk backup`: back up block devices and disk images.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use sbk_engine::{BackupOptions, BackupOutcome, EngineError};
use sbk_store::LockKind;

use super::Context;
use crate::exit::{engine_exit, Exit};
use crate::output::{bytes, rate, rate_num};

/// Back up block devices or disk-image files, one snapshot per source.
///
/// Each SOURCE is read through O_DIRECT (holes of sparse files are skipped), cut into chunks,
/// and every chunk not yet in the repository is compressed and stored. Several sources are
/// backed up in parallel. Snapshots are written only once all their data is durable: an
/// interrupted backup leaves no snapshot behind and the next backup simply runs again.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Block devices or disk-image files to back up.
    #[arg(required = true, value_name = "SOURCE")]
    sources: Vec<PathBuf>,

    /// Tag the snapshots (repeatable).
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,

    /// Host name recorded in the snapshots [default: this machine's].
    #[arg(long, value_name = "HOST")]
    host: Option<String>,
}

fn describe(o: &BackupOutcome) -> (String, serde_json::Value) {
    let m = &o.manifest;
    let f = &m.figures;
    let data = m.size - f.bytes_zero;
    // Dedup ratio: data the snapshot refers to per byte of new data it had to store.
    let dedup = (f.new_raw > 0).then(|| data as f64 / f.new_raw as f64);
    let line = format!(
        "snapshot {} saved: {} ({}): read {}, {} zero, new {} in {} chunks, stored {}, dedup {}, {} in {:.1} s",
        &o.snapshot.to_hex()[..8],
        m.source,
        bytes(m.size),
        bytes(f.bytes_read),
        bytes(f.bytes_zero),
        bytes(f.new_raw),
        f.new_chunks,
        bytes(f.new_stored),
        dedup.map_or("all data already stored".into(), |d| format!("{d:.2}x")),
        rate(m.size, f.duration_ms),
        f.duration_ms as f64 / 1000.0,
    );
    let json = serde_json::json!({
        "snapshot": o.snapshot.to_hex(),
        "source": m.source,
        "host": m.host,
        "tags": m.tags,
        "size": m.size,
        "bytes_read": f.bytes_read,
        "bytes_zero": f.bytes_zero,
        "new_bytes": f.new_raw,
        "new_bytes_stored": f.new_stored,
        "chunks": f.chunks,
        "new_chunks": f.new_chunks,
        "dedup_ratio": dedup,
        "duration_ms": f.duration_ms,
        "throughput_bytes_per_sec": rate_num(m.size, f.duration_ms),
        "direct_io": o.fallback.is_none(),
        "parent": m.parent.map(|p| p.to_hex()),
    });
    (line, json)
}

/// Runs `sbk backup`.
pub fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let (repo, _lock) = ctx.open_locked(LockKind::Shared, "backup", true)?;
    let opts = BackupOptions {
        threads: ctx.threads,
        host: args.host.unwrap_or_else(sbk_store::host_name),
        tags: args.tags,
    };
    let progress = ctx.out.progress();
    let results = sbk_engine::backup(&repo, &args.sources, &opts, &progress)?;
    let mut json = Vec::new();
    let mut failures: Vec<(PathBuf, EngineError)> = Vec::new();
    for (path, r) in args.sources.iter().zip(results) {
        match r {
            Ok(o) => {
                let (line, j) = describe(&o);
                ctx.out.info(&line, false);
                json.push(j);
            }
            Err(e) => {
                json.push(serde_json::json!({ "source": path, "error": e.to_string() }));
                failures.push((path.clone(), e));
            }
        }
    }
    ctx.out.json(&serde_json::Value::Array(json), false);
    let ok = args.sources.len() - failures.len();
    let code = match failures.len() {
        0 => Exit::Ok,
        1 if ok == 0 => engine_exit(&failures[0].1),
        _ if ok == 0 => failures
            .iter()
            .map(|(_, e)| engine_exit(e))
            .max_by_key(|c| *c as u8)
            .unwrap_or(Exit::Error),
        _ => Exit::Partial,
    };
    for (path, e) in &failures {
        eprintln!("sbk: error: backup of {} failed: {e}", path.display());
    }
    if !failures.is_empty() && ok > 0 {
        eprintln!(
            "sbk: {ok} of {} sources backed up; no snapshot was written for the failed ones",
            args.sources.len()
        );
    }
    Ok(code.into())
}
