//! `sbk verify`: check that the repository's snapshots can be restored.

use std::process::ExitCode;

use anyhow::Result;
use sbk_engine::{ReadData, VerifyOptions};
use sbk_store::LockKind;

use super::Context;
use crate::exit::Exit;
use crate::output::{bytes, rate, rate_num};

/// Check the repository: structure always, stored data on request.
///
/// The structural check decodes every manifest and segment tree, and checks that every chunk a
/// snapshot needs is indexed, in a pack that exists and lists it where the index says, and that
/// pack trailers agree with their blob headers. `--read-data` also reads, decompresses and
/// re-hashes every stored chunk; `--read-data-subset` reads a part of the packs (`10%`, or
/// `2/7` for the second of seven parts: run 1/7 to 7/7 on successive days to cover everything).
/// Each problem is reported with the snapshots it affects; any problem exits with code 12.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Snapshots to check (full ids, unique prefixes or `latest`); all when none are given.
    #[arg(value_name = "SNAPSHOT")]
    snapshots: Vec<String>,

    /// Read back and re-hash every stored chunk.
    #[arg(long, conflicts_with = "read_data_subset")]
    read_data: bool,

    /// Read back a subset of the packs: `N%` or `n/m`.
    #[arg(long, value_name = "N% | n/m", value_parser = parse_subset)]
    read_data_subset: Option<ReadData>,

    /// Write Prometheus text-format metrics of this run to PATH (atomically): success (no
    /// problem found), problems, packs and bytes read back, duration, last run time.
    #[arg(long, value_name = "PATH")]
    metrics_file: Option<std::path::PathBuf>,

    /// Keep a record of this run (status, problems, what was read; the last 100 runs) under
    /// DIR/runs/verify/REPOSITORY/ [default: $SBK_STATE_DIR, else /var/lib/sbk as root, else
    /// $XDG_STATE_HOME/sbk].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<std::path::PathBuf>,
}

fn parse_subset(s: &str) -> Result<ReadData, String> {
    if let Some(p) = s.strip_suffix('%') {
        let p: f64 = p
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: expected a percentage such as 10%"))?;
        if !(p > 0.0 && p <= 100.0) {
            return Err(format!(
                "{s:?}: the percentage must be above 0 and at most 100"
            ));
        }
        return Ok(ReadData::Percent(p));
    }
    let (n, m) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: expected N% or n/m"))?;
    let (n, m): (u32, u32) = (
        n.trim().parse().map_err(|_| format!("{s:?}: bad n"))?,
        m.trim().parse().map_err(|_| format!("{s:?}: bad m"))?,
    );
    if m == 0 || n == 0 || n > m {
        return Err(format!("{s:?}: need 1 <= n <= m"));
    }
    Ok(ReadData::Part { n, m })
}

/// Each problem on stderr, with the snapshots it affects.
fn print_problems(problems: &[sbk_engine::Problem]) {
    for p in problems {
        let affected = if p.snapshots.is_empty() {
            String::new()
        } else {
            format!(
                " [affects snapshots {}]",
                p.snapshots
                    .iter()
                    .map(|s| s.to_hex()[..8].to_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        eprintln!("sbk: problem: {}{affected}", p.what);
    }
}

/// Writes the run's metrics to `file` (see `--metrics-file`).
/// Writes verify's metrics: of its report, or of a verify that could not run (`None`: success
/// 0, so that a damaged config or a wrong password alerts as problems do).
fn write_metrics(
    file: &std::path::Path,
    location: &str,
    report: Option<&sbk_engine::VerifyReport>,
) -> Result<()> {
    use crate::metrics::{now, Metrics};
    let l = crate::metrics::labels(&[("repository", location)]);
    let mut m = Metrics::default();
    let Some(report) = report else {
        m.gauge(
            "sbk_verify_success",
            "1 when the last verify found no problem, else 0.",
            &l,
            0.0,
        );
        m.gauge(
            "sbk_verify_last_run_timestamp_seconds",
            "When verify last ran (Unix time).",
            &l,
            now(),
        );
        return m.write(file).map_err(|e| {
            anyhow::anyhow!("{}: cannot write the metrics file: {e}", file.display())
        });
    };
    let ok = report.problems.is_empty();
    m.gauge(
        "sbk_verify_success",
        "1 when the last verify found no problem, else 0.",
        &l,
        f64::from(u8::from(ok)),
    );
    m.gauge(
        "sbk_verify_problems",
        "Problems the last verify found.",
        &l,
        report.problems.len() as f64,
    );
    m.gauge(
        "sbk_verify_last_run_timestamp_seconds",
        "When verify last ran (Unix time).",
        &l,
        now(),
    );
    m.gauge(
        "sbk_verify_duration_seconds",
        "Wall time of the last verify.",
        &l,
        report.duration_ms as f64 / 1000.0,
    );
    m.gauge(
        "sbk_verify_read_bytes",
        "Bytes of packs the last verify read back.",
        &l,
        report.bytes_read as f64,
    );
    m.write(file)
        .map_err(|e| anyhow::anyhow!("{}: cannot write the metrics file: {e}", file.display()))?;
    Ok(())
}

/// Runs `sbk verify`.
pub fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let started = sbk_store::unix_now_ns();
    let mut problems = Vec::new();
    let mut stored = None;
    let result = verify_repo(ctx, &args, &mut problems, &mut stored);
    let location = ctx
        .repo
        .as_ref()
        .map_or_else(String::new, |r| r.to_string_lossy().into_owned());
    if let (Err(_), Some(file)) = (&result, &args.metrics_file) {
        if let Err(e) = write_metrics(file, &location, None) {
            ctx.out.notice(&format!("{e:#}"));
        }
    }
    if let Some(dir) = sbk_records::state_dir(args.state_dir.as_deref()) {
        let exit = match &result {
            Ok(_) if problems.is_empty() => Exit::Ok as u8,
            Ok(_) => Exit::Damaged as u8,
            // Stopped: main exits 128 + the signal.
            Err(_) if crate::signals::received().is_some() => {
                128 + crate::signals::received().unwrap_or(0) as u8
            }
            Err(e) => crate::exit::classify(e) as u8,
        };
        let record = serde_json::json!({
            "kind": "verify",
            "repository": ctx.repo,
            "started": sbk_records::time(started),
            "ended": sbk_records::time(sbk_store::unix_now_ns()),
            "status": match (&result, problems.is_empty()) {
                (Err(_), _) if exit >= 128 => "stopped",
                (Err(_), _) => "failure",
                (Ok(_), true) => "success",
                (Ok(_), false) => "problems",
            },
            "read_data": args.read_data || args.read_data_subset.is_some(),
            "stored_bytes": stored,
            "problems": problems,
            "error": result.as_ref().err().map(|e| format!("{e:#}")),
            "exit_code": exit,
        });
        // The record is for the operator: failing to keep it changes no verdict.
        if let Err(e) = sbk_records::write(&dir, "verify", &location, started, &record) {
            ctx.out.notice(&format!(
                "cannot keep the record of this run in {}: {e}",
                dir.display()
            ));
        }
    }
    result
}

/// Verifies the repository; the problems found go into `problems` as text, the bytes of its
/// packs into `stored`.
fn verify_repo(
    ctx: &Context,
    args: &Args,
    problems: &mut Vec<String>,
    stored: &mut Option<u64>,
) -> Result<ExitCode> {
    let (repo, _lock) = ctx.open_locked(LockKind::Shared, "verify", true)?;
    let snapshots = args
        .snapshots
        .iter()
        .map(|s| repo.resolve_snapshot(s))
        .collect::<Result<Vec<_>, _>>()?;
    let read_data = if args.read_data {
        ReadData::All
    } else {
        args.read_data_subset.unwrap_or(ReadData::None)
    };
    let report = sbk_engine::verify(
        &repo,
        &VerifyOptions {
            snapshots,
            read_data,
            threads: ctx.threads,
        },
        &ctx.out.progress(),
    )?;
    print_problems(&report.problems);
    *stored = Some(report.pack_bytes);
    problems.extend(report.problems.iter().map(|p| p.what.to_string()));
    ctx.out.info(
        &format!(
            "checked {} snapshots and {} packs; read back {} packs, {} chunks, {} at {}: {}",
            report.snapshots,
            report.packs,
            report.packs_read,
            report.blobs_read,
            bytes(report.bytes_read),
            rate(report.bytes_read, report.duration_ms),
            if report.problems.is_empty() {
                "no problems found".to_owned()
            } else {
                format!("{} PROBLEMS", report.problems.len())
            }
        ),
        false,
    );
    ctx.out.json(
        &serde_json::json!({
            "snapshots": report.snapshots,
            "packs": report.packs,
            "packs_read": report.packs_read,
            "blobs_read": report.blobs_read,
            "bytes_read": report.bytes_read,
            "duration_ms": report.duration_ms,
            "throughput_bytes_per_sec": rate_num(report.bytes_read, report.duration_ms),
            "problems": report.problems.iter().map(|p| serde_json::json!({
                "problem": p.what,
                "snapshots": p.snapshots.iter().map(|s| s.to_hex()).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        }),
        false,
    );
    if let Some(file) = &args.metrics_file {
        write_metrics(file, &repo.location(), Some(&report))?;
    }
    Ok(if report.problems.is_empty() {
        Exit::Ok
    } else {
        Exit::Damaged
    }
    .into())
}
