//! `sbk prune`: reclaim the space of data no snapshot refers to.

use std::process::ExitCode;

use anyhow::Result;
use sbk_engine::{PruneMode, PruneOptions, PruneReport};
use sbk_store::LockKind;

use super::Context;
use crate::exit::Exit;
use crate::output::bytes;

/// Remove data that no snapshot refers to.
///
/// Deletes packs whose blobs are all unused and repacks those whose unused share exceeds
/// `--max-unused`. Blobs that stay are copied into new packs, which are made durable and indexed
/// before anything old is deleted, so an interrupted prune loses nothing.
///
/// By default prune runs beside backups (any number, from any host), in two phases: each run
/// marks the packs it would delete, and deletes those an earlier run marked, once the grace
/// period has passed and every backup that started before the mark has ended (backups never
/// reuse data in a marked pack). Run it regularly (after `forget`): the space of one run's marks
/// comes back with the next. `--exclusive` deletes at once instead, and needs the repository to
/// itself (it refuses while another sbk process uses it).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Repack a pack once more than this percentage of it is unused.
    #[arg(long, default_value_t = 5.0, value_name = "PERCENT", value_parser = parse_percent)]
    pub max_unused: f64,

    /// Take the repository to itself (an exclusive lock) and delete at once, without marks.
    #[arg(long)]
    pub exclusive: bool,

    /// How long a mark waits before a later run acts on it, by the storage's clock: more than
    /// the storage's clock skew, listing delay and slowest write (`30s`, `10m`, `1h`; `0s` is
    /// for tests).
    #[arg(long, default_value = "10m", value_name = "DURATION", value_parser = parse_grace, conflicts_with = "exclusive")]
    pub grace: std::time::Duration,

    /// Say what would be done, and then what would happen to each pack and why (PACK ACTION
    /// REASON BYTES lines; a `plan` array with --json); change nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Write Prometheus text-format metrics of this run to PATH (atomically): success, last
    /// success time, duration, bytes reclaimed, packs deleted, repacked and marked, marks
    /// waiting.
    #[arg(long, value_name = "PATH")]
    pub metrics_file: Option<std::path::PathBuf>,

    /// Keep a record of this run (status, stored size after it, bytes reclaimed; the last 100
    /// runs) under DIR/runs/prune/REPOSITORY/, where the console reads it [default:
    /// $SBK_STATE_DIR, else /var/lib/sbk as root, else $XDG_STATE_HOME/sbk]. A dry run keeps
    /// none.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<std::path::PathBuf>,
}

/// Parses a percentage from 0 to 100 (a trailing `%` is allowed).
pub fn parse_percent(s: &str) -> Result<f64, String> {
    let p: f64 = s
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("{s:?} is not a percentage"))?;
    if (0.0..=100.0).contains(&p) {
        Ok(p)
    } else {
        Err(format!("{s:?}: the percentage must be between 0 and 100"))
    }
}

/// Parses a grace period (`humantime`: `90s`, `10m`, `1h`).
pub fn parse_grace(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration: {e}"))
}

/// Prunes an open repository (the caller has no lock; this takes a prune lock, or with
/// `--exclusive` the exclusive one).
pub fn prune_repo(ctx: &Context, repo: &sbk_store::Repository, args: &Args) -> Result<PruneReport> {
    let started = sbk_store::unix_now_ns();
    let result = prune_locked(ctx, repo, args);
    if !args.dry_run {
        record(ctx, args, started, &result);
    }
    result
}

/// Takes the lock prune needs, loads the index and prunes.
fn prune_locked(ctx: &Context, repo: &sbk_store::Repository, args: &Args) -> Result<PruneReport> {
    let (kind, mode) = if args.exclusive {
        (LockKind::Exclusive, PruneMode::Exclusive)
    } else {
        (
            LockKind::Prune,
            PruneMode::Beside {
                grace_secs: args.grace.as_secs() as i64,
            },
        )
    };
    let lock = ctx.lock(repo, kind, "prune")?;
    // The index locates the segment trees; what prune keeps and deletes is decided from the
    // index files themselves.
    ctx.load_index(repo)?;
    let report = sbk_engine::prune(
        repo,
        &lock,
        &PruneOptions {
            max_unused_percent: args.max_unused,
            dry_run: args.dry_run,
            threads: ctx.threads,
            mode,
        },
        &ctx.out.progress(),
    )?;
    let line = summary(&report, args);
    ctx.out.info(&line, false);
    for n in &report.notices {
        ctx.out.notice(n);
    }
    // A dry run shows the plan, pack by pack: PACK ACTION REASON BYTES.
    let plan: Vec<serde_json::Value> = if args.dry_run {
        report
            .plan
            .iter()
            .map(|p| {
                ctx.out.info(
                    &format!("{} {} {} {}", p.pack, p.action, p.reason, p.bytes),
                    false,
                );
                serde_json::json!({
                    "pack": p.pack.to_string(),
                    "action": p.action.to_string(),
                    "reason": p.reason.to_string(),
                    "bytes": p.bytes,
                })
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut json = report_json(&report, args);
    if args.dry_run {
        json["plan"] = serde_json::Value::Array(plan);
    }
    ctx.out.json(&json, false);
    Ok(report)
}

/// The summary line of a prune (or of what a dry run would do).
fn summary(report: &PruneReport, args: &Args) -> String {
    let (now, later) = if args.dry_run {
        ("would remove", "would mark")
    } else {
        ("removed", "marked")
    };
    let mut line = format!(
        "{now} {} of {} packs ({} named by no index file) and repack {} ({} of used data into {} new packs), dropping {} unused blobs: {} reclaimed of the {} of packs ({} of packs removed, {} written)",
        report.packs_deleted + report.packs_unindexed,
        report.packs,
        report.packs_unindexed,
        report.packs_repacked,
        bytes(report.bytes_repacked),
        report.packs_written,
        report.blobs_dropped,
        bytes(report.bytes_reclaimed),
        bytes(report.bytes_before),
        bytes(report.bytes_removed),
        bytes(report.bytes_written),
    );
    if report.bytes_leftovers > 0 {
        line += &format!(
            ", and {} of leftovers of interrupted writes removed",
            bytes(report.bytes_leftovers)
        );
    }
    line += &format!(" in {:.1} s", report.duration_ms as f64 / 1000.0);
    if !args.exclusive {
        line += &format!(
            "; {later} {} packs ({}) for a later prune to delete",
            report.packs_marked,
            bytes(report.bytes_marked)
        );
        if report.packs_revived > 0 {
            line += &format!(
                "; {} marked packs are used again and stay",
                report.packs_revived
            );
        }
        if let Some(why) = &report.waiting_because {
            line += &format!("; {} earlier marks wait ({why})", report.marks_waiting);
        }
    }
    if let Some(v) = &report.versions {
        let deleted = if args.dry_run {
            "would delete"
        } else {
            "deleted"
        };
        line += &format!(
            "; Object Lock: {deleted} {} old versions ({}) and {} delete markers of objects no longer in the repository",
            v.versions_deleted,
            bytes(v.bytes_freed),
            v.markers_deleted
        );
        if let Some(until) = &v.retained_until {
            line += &format!(
                ", {} more are retained (the first until {until})",
                v.versions_retained
            );
        }
    }
    line
}

/// The `--json` report of a prune.
fn report_json(report: &PruneReport, args: &Args) -> serde_json::Value {
    serde_json::json!({
            "dry_run": args.dry_run,
            "exclusive": args.exclusive,
            "packs_marked": report.packs_marked,
            "bytes_marked": report.bytes_marked,
            "packs_revived": report.packs_revived,
            "marks_waiting": report.marks_waiting,
            "waiting_because": report.waiting_because,
            "notices": report.notices,
            "packs": report.packs,
            "packs_deleted": report.packs_deleted,
            "packs_unindexed": report.packs_unindexed,
            "index_files_before": report.index_files_before,
            "index_files_written": report.index_files_written,
            "packs_repacked": report.packs_repacked,
            "packs_written": report.packs_written,
            "blobs_dropped": report.blobs_dropped,
            "bytes_repacked": report.bytes_repacked,
            "bytes_removed": report.bytes_removed,
            "bytes_written": report.bytes_written,
            "bytes_reclaimed": report.bytes_reclaimed,
            "bytes_before": report.bytes_before,
            "bytes_leftovers": report.bytes_leftovers,
            "duration_ms": report.duration_ms,
            "object_lock": report.versions.as_ref().map(|v| serde_json::json!({
                "versions_deleted": v.versions_deleted,
                "bytes_freed": v.bytes_freed,
                "markers_deleted": v.markers_deleted,
                "versions_retained": v.versions_retained,
                "retained_until": v.retained_until,
            })),
    })
}

/// Keeps the record of a prune (see sbk-records): the stored size it leaves is a point of the
/// console's chart of the repository's size.
fn record(ctx: &Context, args: &Args, started: i64, result: &Result<PruneReport>) {
    let Some(dir) = sbk_records::state_dir(args.state_dir.as_deref()) else {
        return;
    };
    let location = ctx
        .repo
        .as_ref()
        .map_or_else(String::new, |r| r.to_string_lossy().into_owned());
    let report = result.as_ref().ok();
    let record = serde_json::json!({
        "kind": "prune",
        "repository": location,
        "started": sbk_records::time(started),
        "ended": sbk_records::time(sbk_store::unix_now_ns()),
        "status": if result.is_ok() { "success" } else { "failure" },
        "error": result.as_ref().err().map(|e| format!("{e:#}")),
        "exit_code": match result {
            Ok(_) => Exit::Ok as u8,
            Err(e) => crate::exit::classify(e) as u8,
        },
        "stored_bytes": report.map(|r| r.bytes_before - r.bytes_reclaimed),
        "reclaimed_bytes": report.map(|r| r.bytes_reclaimed + r.bytes_leftovers),
        "packs_deleted": report.map(|r| r.packs_deleted),
        "packs_repacked": report.map(|r| r.packs_repacked),
    });
    // The record is for the operator: failing to keep it changes no outcome.
    if let Err(e) = sbk_records::write(&dir, "prune", &location, started, &record) {
        ctx.out.notice(&format!(
            "cannot keep the record of this run in {}: {e}",
            dir.display()
        ));
    }
}

/// Runs `sbk prune`.
pub fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let repo = ctx.open_repo()?;
    let result = prune_repo(ctx, &repo, &args);
    if let Some(file) = &args.metrics_file {
        use crate::metrics::{now, Metrics};
        let l = crate::metrics::labels(&[("repository", &repo.location())]);
        let mut m = Metrics::default();
        m.gauge(
            "sbk_prune_success",
            "1 when the last prune succeeded, else 0.",
            &l,
            f64::from(u8::from(result.is_ok())),
        );
        if let Ok(r) = &result {
            m.gauge(
                "sbk_prune_last_success_timestamp_seconds",
                "When prune last succeeded (Unix time).",
                &l,
                now(),
            );
            m.gauge(
                "sbk_prune_duration_seconds",
                "Wall time of the last successful prune.",
                &l,
                r.duration_ms as f64 / 1000.0,
            );
            m.gauge(
                "sbk_prune_reclaimed_bytes",
                "Bytes given back by the last prune: packs removed minus packs written, plus leftovers of interrupted writes.",
                &l,
                (r.bytes_reclaimed + r.bytes_leftovers) as f64,
            );
            m.gauge(
                "sbk_prune_packs_deleted",
                "Packs the last prune deleted.",
                &l,
                r.packs_deleted as f64,
            );
            m.gauge(
                "sbk_prune_packs_repacked",
                "Packs the last prune rewrote.",
                &l,
                r.packs_repacked as f64,
            );
            m.gauge(
                "sbk_prune_packs_marked",
                "Packs the last prune marked for a later prune to delete.",
                &l,
                r.packs_marked as f64,
            );
            m.gauge(
                "sbk_prune_marks_waiting",
                "Marks of earlier prunes the last prune could not act on yet (a backup older than the mark still runs, or the grace period has not passed).",
                &l,
                r.marks_waiting as f64,
            );
        }
        m.carry_over(
            file,
            "sbk_prune_last_success_timestamp_seconds",
            "When prune last succeeded (Unix time).",
            &[l],
        );
        m.write(file).map_err(|e| {
            anyhow::anyhow!("{}: cannot write the metrics file: {e}", file.display())
        })?;
    }
    result?;
    Ok(Exit::Ok.into())
}
