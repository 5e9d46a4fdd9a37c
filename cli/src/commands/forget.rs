//! `sbk forget`: remove snapshots by id or by a retention policy.

use std::process::ExitCode;

use anyhow::Result;
use sbk_engine::{ForgetSelection, ForgetVerdict, Policy, Within};
use sbk_store::LockKind;

use super::Context;
use crate::exit::{Exit, ExitWith};
use sbk_records::time;

/// Remove snapshots, by id or by a retention policy.
///
/// A policy is evaluated per (host, source) group, newest first: `--keep-last N` keeps the N
/// newest; `--keep-daily N` the newest of each of the N most recent days with a snapshot (and so
/// on for hourly, weekly (ISO weeks), monthly, yearly; times in UTC); `--keep-tag T` every
/// snapshot tagged T; `--keep-within D` every snapshot younger than D by the storage's clock. A
/// snapshot is kept when any rule keeps it, and the output says which.
/// A policy that would remove every snapshot of a group is refused: name the snapshots to do
/// that. Forgetting is cheap; the space comes back with `sbk prune` (or `--prune`).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Snapshots to remove (full ids, unique prefixes or `latest`).
    #[arg(value_name = "SNAPSHOT", conflicts_with_all = ["keep_last", "keep_hourly", "keep_daily", "keep_weekly", "keep_monthly", "keep_yearly", "keep_tag", "keep_within", "host", "source"])]
    snapshots: Vec<String>,
    /// Keep the N newest snapshots of each group.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    keep_last: Option<u32>,
    /// Keep the newest snapshot of each of the N most recent hours.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    keep_hourly: Option<u32>,
    /// Keep the newest snapshot of each of the N most recent days.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    keep_daily: Option<u32>,
    /// Keep the newest snapshot of each of the N most recent ISO weeks.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    keep_weekly: Option<u32>,
    /// Keep the newest snapshot of each of the N most recent months.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    keep_monthly: Option<u32>,
    /// Keep the newest snapshot of each of the N most recent years.
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    keep_yearly: Option<u32>,
    /// Keep every snapshot with this tag (repeatable).
    #[arg(long, value_name = "TAG", value_parser = crate::names::parse)]
    keep_tag: Vec<String>,
    /// Keep every snapshot taken within DURATION (`30d`, `12h`) of now, by the storage's clock:
    /// unlike --keep-last, a flood of new (or future-dated) snapshots cannot push older ones out.
    #[arg(long, value_name = "DURATION", value_parser = crate::output::parse_duration)]
    keep_within: Option<(u64, String)>,
    /// Apply the policy only to snapshots of this host.
    #[arg(long, value_name = "HOST", value_parser = crate::names::parse)]
    host: Option<String>,
    /// Apply the policy only to snapshots of this source.
    #[arg(long, value_name = "SOURCE", value_parser = crate::names::parse)]
    source: Option<String>,
    /// Say what would be removed; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Run prune afterwards.
    #[arg(long)]
    prune: bool,
    /// With --prune: repack a pack once more than this percentage of it is unused.
    #[arg(long, default_value_t = 5.0, value_name = "PERCENT", requires = "prune", value_parser = super::prune::parse_percent)]
    max_unused: f64,
    /// With --prune: delete at once under an exclusive lock (see `sbk prune --exclusive`).
    #[arg(long, requires = "prune")]
    exclusive: bool,
    /// With --prune: how long its marks wait (see `sbk prune --grace`).
    #[arg(long, default_value = "10m", value_name = "DURATION", requires = "prune", value_parser = super::prune::parse_grace, conflicts_with = "exclusive")]
    grace: std::time::Duration,
}

/// Runs `sbk forget`. Long (about 100 lines), as the command reads: select, print each verdict,
/// remove, then prune when asked.
pub fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let (repo, lock) = ctx.open_locked(LockKind::Shared, "forget", false)?;
    let policy = Policy {
        last: args.keep_last,
        hourly: args.keep_hourly,
        daily: args.keep_daily,
        weekly: args.keep_weekly,
        monthly: args.keep_monthly,
        yearly: args.keep_yearly,
        tags: args.keep_tag.clone(),
        // Now is when this forget took its lock, by the storage's clock: never a host's.
        within: args.keep_within.clone().map(|(secs, label)| Within {
            secs,
            now: lock.started(),
            label,
        }),
    };
    if args.snapshots.is_empty() && policy.is_empty() {
        return Err(ExitWith(
            Exit::Usage,
            "name the snapshots to forget, or give a policy (--keep-last, --keep-daily, …)".into(),
        )
        .into());
    }
    let verdicts = sbk_engine::select_forget(
        &repo,
        &ForgetSelection {
            named: args.snapshots.clone(),
            policy,
            host: args.host.clone(),
            source: args.source.clone(),
            now: lock.started(),
        },
    )?;
    let describe = |v: &ForgetVerdict| match &v.manifest {
        Some(m) => format!(
            "{} {} {} {}",
            &v.id.to_hex()[..8],
            time(m.time_ns),
            m.host,
            m.source
        ),
        None => v.id.to_hex()[..8].to_owned(),
    };
    let mut json = Vec::new();
    let mut removed = 0;
    for v in &verdicts {
        let (id, reasons) = (&v.id, &v.reasons);
        if reasons.is_empty() {
            ctx.out.info(
                &format!(
                    "{} {}",
                    if args.dry_run {
                        "would remove"
                    } else {
                        "remove"
                    },
                    describe(v)
                ),
                false,
            );
            if !args.dry_run {
                repo.remove_snapshot(id)?;
            }
            removed += 1;
        } else {
            ctx.out.info(
                &format!("keep   {}  ({})", describe(v), reasons.join(", ")),
                false,
            );
        }
        json.push(serde_json::json!({"snapshot": id.to_hex(), "keep": !reasons.is_empty(), "reasons": reasons}));
    }
    ctx.out.info(
        &format!(
            "{} {removed} snapshots, kept {}",
            if args.dry_run {
                "would remove"
            } else {
                "removed"
            },
            verdicts.len() - removed
        ),
        false,
    );
    ctx.out.json(
        &serde_json::json!({"dry_run": args.dry_run, "snapshots": json}),
        false,
    );
    drop(lock);
    if args.prune && !args.dry_run {
        super::prune::prune_repo(
            ctx,
            &repo,
            &super::prune::Args {
                metrics_file: None,
                max_unused: args.max_unused,
                dry_run: false,
                exclusive: args.exclusive,
                grace: args.grace,
                state_dir: None,
            },
        )?;
    }
    Ok(Exit::Ok.into())
}
