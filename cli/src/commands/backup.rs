//! `sbk backup`: back up block devices and disk images.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use sbk_engine::{BackupOptions, BackupOutcome, ChangedOptions, EngineError, SourceSpec};
use sbk_store::LockKind;

use super::Context;
use crate::exit::{engine_exit, Exit};
use crate::output::{bytes, changed_blocks_json, rate, rate_num};

/// Back up block devices or disk-image files, one snapshot per source.
///
/// Each SOURCE is read through O_DIRECT (holes of sparse files are skipped), cut into chunks,
/// and every chunk not yet in the repository is compressed and stored. Several sources are
/// backed up in parallel. Snapshots are written only once all their data is durable: an
/// interrupted backup leaves no snapshot behind and the next backup simply runs again.
///
/// A SOURCE may also be an NBD export: `nbd://HOST[:PORT]/EXPORT` or
/// `nbd+unix:///EXPORT?socket=PATH` (a VM disk exported by `qemu-nbd`, say), read by sbk's own
/// client, holes skipped.
///
/// `-` reads an image from standard input (`rbd export pool/vm@snap - | sbk backup - --source-name
/// vm`), zero runs still found; the snapshot's size is what was read. A pipe cut short looks like
/// a smaller disk: prefer `--source-command CMD`, which fails the backup when CMD does.
#[derive(clap::Args, Debug)]
#[command(group = clap::ArgGroup::new("changes").args(["changed_blocks", "dirty_bitmap"]))]
pub struct Args {
    /// Block devices, disk-image files or NBD URIs to back up; `-` for standard input (with
    /// --source-name).
    #[arg(required_unless_present = "source_command", value_name = "SOURCE")]
    sources: Vec<PathBuf>,

    /// Back up the standard output of `sh -c CMD` (with --source-name, in place of SOURCE), for
    /// `rbd export pool/vm@snap -`, `ssh host dd if=/dev/sdb bs=4M`. When CMD exits non-zero the
    /// source fails and no snapshot is written: what it wrote may be cut short.
    #[arg(long, value_name = "CMD", conflicts_with = "sources")]
    source_command: Option<String>,

    /// Tag the snapshots (repeatable).
    #[arg(long = "tag", value_name = "TAG", value_parser = crate::names::parse)]
    tags: Vec<String>,

    /// Host name recorded in the snapshots [default: this machine's].
    #[arg(long, value_name = "HOST", value_parser = crate::names::parse)]
    host: Option<String>,

    /// Record NAME as the snapshot's source instead of the canonical path (one SOURCE only).
    /// Storage snapshots get a new device path every night; retention and parent lookup go by
    /// this name.
    #[arg(long, value_name = "NAME", value_parser = crate::names::parse)]
    source_name: Option<String>,

    /// Read only what a changed-block list says changed since the parent snapshot (one SOURCE
    /// only; `-` reads the list from stdin). Formats, told apart by content: `rbd diff --format
    /// json`, LVM `thin_delta` XML (default or --verbose), or lines of `OFFSET LENGTH` (decimal or
    /// 0x hex). Unchanged segments reuse the parent's trees unread; the snapshot is exact.
    #[arg(long, value_name = "FILE", conflicts_with = "dirty_bitmap")]
    changed_blocks: Option<PathBuf>,

    /// For an NBD source: take the changed-block list from QEMU's dirty bitmap NAME (the
    /// `qemu:dirty-bitmap:NAME` context of `qemu-nbd -B NAME`), relative to the parent snapshot.
    /// sbk never clears or changes a bitmap. An export without it is refused (exit 13).
    #[arg(long, value_name = "NAME")]
    dirty_bitmap: Option<String>,

    /// Write Prometheus text-format metrics of this run to PATH (atomically), for
    /// node_exporter's textfile collector: per source, success, last success time, duration,
    /// bytes read, skipped by a changed-block list, new and stored, and the dedup ratio.
    #[arg(long, value_name = "PATH")]
    metrics_file: Option<PathBuf>,

    /// With --dirty-bitmap: when the export lacks the bitmap (qemu drops an inconsistent one
    /// after a crash), read the whole source instead of failing.
    #[arg(long, requires = "dirty_bitmap")]
    full_on_bad_bitmap: bool,

    /// The parent the list is relative to [default: the newest snapshot of this host and source,
    /// or with --cbt-since the newest carrying that token].
    #[arg(long, value_name = "SNAPSHOT", requires = "changes")]
    parent: Option<String>,

    /// Record this run's storage-side snapshot id (an rbd snap id, a thin device id, a VMware
    /// changeId), so that a later --cbt-since can name it.
    #[arg(long, value_name = "TOKEN")]
    cbt_token: Option<String>,

    /// The storage-side state the list starts from: the parent is the newest snapshot of the
    /// source carrying this token, and none is a refusal.
    #[arg(
        long,
        value_name = "TOKEN",
        requires = "changes",
        conflicts_with = "parent"
    )]
    cbt_since: Option<String>,

    /// Re-read this percentage of the segments the list calls unchanged (always at least one,
    /// so 0 means one) and compare them with the parent: a list that lies is caught, reported,
    /// and the source is read in full.
    #[arg(long, value_name = "PCT", default_value_t = 1.0, value_parser = super::prune::parse_percent, requires = "changes")]
    verify_unchanged: f64,
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
        "changed_blocks": m.changed_blocks().and_then(|r| r.ok()).as_ref().map(changed_blocks_json),
    });
    (line, json)
}

/// Checks the arguments and reads the changed-block list, before anything else: a bad one
/// changes nothing.
fn check_args(args: &Args) -> Result<Option<sbk_engine::ChangedList>> {
    check_streams(args)?;
    // A source recorded by its path needs a path that is a usable name.
    if args.source_name.is_none() {
        for s in &args.sources {
            let label = std::fs::canonicalize(s).unwrap_or_else(|_| s.clone());
            if let Err(why) = crate::names::check(&label.to_string_lossy()) {
                anyhow::bail!(crate::exit::ExitWith(
                    Exit::Usage,
                    format!(
                        "{}: the path cannot name the snapshot's source ({why}); give one with --source-name",
                        s.display()
                    )
                ));
            }
        }
    }
    let one = args.changed_blocks.is_some() || args.dirty_bitmap.is_some();
    let sources = args.sources.len() + usize::from(args.source_command.is_some());
    if (one || args.source_name.is_some()) && sources != 1 {
        anyhow::bail!(crate::exit::ExitWith(
            Exit::Usage,
            "--changed-blocks, --dirty-bitmap and --source-name take exactly one SOURCE".into()
        ));
    }
    Ok(match &args.changed_blocks {
        None => None,
        Some(file) => {
            let bytes = if file.as_os_str() == "-" {
                let mut b = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut b).map_err(|e| {
                    anyhow::anyhow!("reading the changed-block list from stdin: {e}")
                })?;
                b
            } else {
                std::fs::read(file).map_err(|e| {
                    crate::exit::ExitWith(
                        Exit::Usage,
                        format!(
                            "{}: cannot read the changed-block list: {e}",
                            file.display()
                        ),
                    )
                })?
            };
            Some(sbk_engine::ChangedList::parse(&bytes).map_err(|e| {
                crate::exit::ExitWith(Exit::Usage, format!("{}: {e}", file.display()))
            })?)
        }
    })
}

/// The rules of stream sources (`-`, --source-command), each a usage error (exit 2).
fn check_streams(args: &Args) -> Result<()> {
    let usage = |msg: &str| Err(crate::exit::ExitWith(Exit::Usage, msg.into()).into());
    let stdin = args.sources.iter().filter(|s| s.as_os_str() == "-").count();
    if stdin > 1 {
        return usage("`-` (standard input) may be given once");
    }
    if stdin == 0 && args.source_command.is_none() {
        return Ok(());
    }
    if args.source_name.is_none() {
        return usage(
            "--source-name NAME is required with `-` and --source-command: a stream has no path to name the snapshot by",
        );
    }
    if args.changed_blocks.is_some() || args.dirty_bitmap.is_some() {
        return usage(
            "--changed-blocks and --dirty-bitmap need a source sbk can seek in; a stream is read whole",
        );
    }
    if stdin == 1 && std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        return usage(
            "standard input is a terminal: pipe an image into `sbk backup -`, or use --source-command",
        );
    }
    Ok(())
}

/// What the arguments name to back up, in order.
fn specs(args: &Args) -> Vec<SourceSpec> {
    match &args.source_command {
        Some(c) => vec![SourceSpec::Command(c.clone())],
        None => args
            .sources
            .iter()
            .map(|p| match p.as_os_str() == "-" {
                true => SourceSpec::Stdin,
                false => SourceSpec::Path(p.clone()),
            })
            .collect(),
    }
}

/// Says which sources failed; the exit code: the failure's own when every source failed (the
/// worst of them), partial when some succeeded.
fn report_failures(failures: &[(&SourceSpec, EngineError)], sources: usize) -> Exit {
    let ok = sources - failures.len();
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
    for (spec, e) in failures {
        eprintln!("sbk: error: backup of {spec} failed: {e}");
    }
    if !failures.is_empty() && ok > 0 {
        eprintln!(
            "sbk: {ok} of {} sources backed up; no snapshot was written for the failed ones",
            sources
        );
    }
    code
}

/// Runs `sbk backup`.
pub fn run(ctx: &Context, args: Args) -> Result<ExitCode> {
    let list = check_args(&args)?;
    let sources = specs(&args);
    let list = match &args.dirty_bitmap {
        Some(name) => dirty_list(ctx, &args.sources[0], name, args.full_on_bad_bitmap)?,
        None => list,
    };
    // The lock is taken before the parent is chosen: prune cannot take its trees meanwhile.
    let (repo, lock) = ctx.open_locked(LockKind::Shared, "backup", true)?;
    let changed = match list {
        None => None,
        Some(list) => Some(ChangedOptions {
            list,
            parent: match &args.parent {
                Some(p) => Some(repo.resolve_snapshot(p)?),
                None => None,
            },
            since: args.cbt_since.clone(),
            verify_percent: args.verify_unchanged,
        }),
    };
    let opts = BackupOptions {
        threads: ctx.threads,
        host: args.host.unwrap_or_else(sbk_engine::default_host),
        tags: args.tags,
        source_name: args.source_name,
        cbt_token: args.cbt_token,
        changed,
    };
    let progress = ctx.out.progress();
    let results = sbk_engine::backup(&repo, &lock, &sources, &opts, &progress)?;
    let mut json = Vec::new();
    let mut failures: Vec<(&SourceSpec, EngineError)> = Vec::new();
    let mut outcomes = Vec::new();
    for (spec, r) in sources.iter().zip(results) {
        match r {
            Ok(o) => {
                let (line, j) = describe(&o);
                ctx.out.info(&line, false);
                json.push(j);
                outcomes.push(Some(o));
            }
            Err(e) => {
                json.push(
                    serde_json::json!({ "source": spec.to_string(), "error": e.to_string() }),
                );
                failures.push((spec, e));
                outcomes.push(None);
            }
        }
    }
    ctx.out.json(&serde_json::Value::Array(json), false);
    if let Some(file) = &args.metrics_file {
        write_metrics(file, &opts, &sources, &outcomes)?;
    }
    Ok(report_failures(&failures, sources.len()).into())
}

/// The changed-block list of QEMU dirty bitmap `name` of NBD source `source`; `None` (a full
/// read) when the export lacks it and `full_on_bad` says so.
fn dirty_list(
    ctx: &Context,
    source: &std::path::Path,
    name: &str,
    full_on_bad: bool,
) -> Result<Option<sbk_engine::ChangedList>> {
    let context = format!("{}{name}", sbk_nbd::proto::CONTEXT_DIRTY_BITMAP);
    let src = sbk_engine::Source::open_with(source, &[&context])?;
    match sbk_engine::dirty_ranges(&src, name)? {
        Some(ranges) => Ok(Some(sbk_engine::ChangedList {
            format: "qemu-dirty-bitmap",
            ranges,
        })),
        None if full_on_bad => {
            ctx.out.notice(&format!(
                "{}: the export has no dirty bitmap {name:?}: reading everything (--full-on-bad-bitmap)",
                source.display()
            ));
            Ok(None)
        }
        None => Err(EngineError::ParentUnusable(format!(
            "{} has no dirty bitmap {name:?} (export it with qemu-nbd -B {name}; qemu drops a bitmap left inconsistent by a crash: back up with --full-on-bad-bitmap, or without --dirty-bitmap, to start a new chain)",
            source.display()
        ))
        .into()),
    }
}

/// Writes the run's metrics to `file` (see `--metrics-file`). Long (about 100 lines): a flat list
/// of gauges, each with the help text Prometheus shows.
fn write_metrics(
    file: &std::path::Path,
    opts: &BackupOptions,
    sources: &[SourceSpec],
    outcomes: &[Option<BackupOutcome>],
) -> Result<()> {
    use crate::metrics::{labels, now, Metrics};
    let mut m = Metrics::default();
    let mut all = Vec::new();
    for (spec, o) in sources.iter().zip(outcomes) {
        let source = match (&opts.source_name, o, spec) {
            (_, Some(o), _) => o.manifest.source.clone(),
            (Some(n), None, _) => n.clone(),
            (None, None, SourceSpec::Path(path)) => std::fs::canonicalize(path)
                .unwrap_or_else(|_| path.clone())
                .to_string_lossy()
                .into_owned(),
            (None, None, stream) => stream.to_string(),
        };
        let l = labels(&[("host", &opts.host), ("source", &source)]);
        all.push(l.clone());
        m.gauge(
            "sbk_backup_success",
            "1 when the last backup of the source succeeded, else 0.",
            &l,
            f64::from(u8::from(o.is_some())),
        );
        let Some(o) = o else { continue };
        let f = &o.manifest.figures;
        let skipped = o
            .manifest
            .changed_blocks()
            .and_then(|r| r.ok())
            .map_or(0, |c| c.bytes_skipped);
        let data = o.manifest.size - f.bytes_zero;
        m.gauge(
            "sbk_backup_last_success_timestamp_seconds",
            "When the source was last backed up successfully (Unix time).",
            &l,
            now(),
        );
        m.gauge(
            "sbk_backup_duration_seconds",
            "Wall time of the last successful backup.",
            &l,
            f.duration_ms as f64 / 1000.0,
        );
        m.gauge(
            "sbk_backup_size_bytes",
            "Size of the source.",
            &l,
            o.manifest.size as f64,
        );
        m.gauge(
            "sbk_backup_read_bytes",
            "Bytes read from the source.",
            &l,
            f.bytes_read as f64,
        );
        m.gauge(
            "sbk_backup_skipped_bytes",
            "Bytes a changed-block list let the backup skip.",
            &l,
            skipped as f64,
        );
        m.gauge(
            "sbk_backup_new_bytes",
            "Bytes of new chunks, before compression.",
            &l,
            f.new_raw as f64,
        );
        m.gauge(
            "sbk_backup_stored_bytes",
            "Bytes stored in the repository (compressed, sealed).",
            &l,
            f.new_stored as f64,
        );
        m.gauge(
            "sbk_backup_dedup_ratio",
            "Data referred to per byte of new data (0 when nothing was new).",
            &l,
            if f.new_raw > 0 {
                data as f64 / f.new_raw as f64
            } else {
                0.0
            },
        );
    }
    let failed = outcomes.iter().filter(|o| o.is_none()).count();
    m.gauge(
        "sbk_backup_errors",
        "Sources whose backup failed in the last run.",
        &labels(&[("host", &opts.host)]),
        failed as f64,
    );
    m.carry_over(
        file,
        "sbk_backup_last_success_timestamp_seconds",
        "When the source was last backed up successfully (Unix time).",
        &all,
    );
    m.write(file)
        .map_err(|e| anyhow::anyhow!("{}: cannot write the metrics file: {e}", file.display()))
}
