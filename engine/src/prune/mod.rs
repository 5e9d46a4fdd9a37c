//! `prune`: mark and sweep. Removes the packs that hold only blobs no snapshot refers to, and
//! repacks those whose unused share exceeds a threshold.
//!
//! Two modes (docs/design.md, "prune"). Beside backups (a prune lock, the default), in two
//! phases: a run *marks* the packs it would delete (a marks object), and a later run deletes
//! the marked packs that are still not needed, once the grace period has passed and every lock
//! taken before the mark is gone; backups never dedup against a marked pack. Under an
//! exclusive lock nobody else uses the repository, and unused packs go at once.
//!
//! The run gathers what the snapshots use, the index files, the packs and the marks, computes a
//! pure [`plan`](plan::plan) (an action and a reason per pack; what `--dry-run` prints), and
//! hands it to the executor. Ordering, in both modes: blobs that stay are copied into new packs
//! through the packer, which seals them (durable) and names them in index files of its own;
//! then new index files naming every surviving and new pack are written, and only then are the
//! old index files (the packer's among them) removed; only then are packs deleted. A crash at any point leaves
//! every snapshot restorable: at worst extra packs (named by no index file, swept by a later
//! prune), index files naming a blob twice, or a marks object naming packs that are gone.

#[cfg(test)]
mod crash_tests;
mod execute;
mod liveness;
mod marks;
mod packs;
mod plan;
#[cfg(test)]
mod tests;
mod versions;

use std::collections::{BTreeSet, HashSet};
use std::time::Instant;

use sbk_store::{
    Extent, IndexId, Lock, Lookups, PackEntry, PackId, Repository, RowBits, StoreError,
};

use crate::error::{EngineError, Result};
use crate::pool::worker_pool;
use crate::progress::Progress;
use crate::snapshot::{windows, TreePlaces};
use execute::execute;
use liveness::{liveness, IndexFiles, Used};
use marks::sort_marks;
use packs::Packs;
use plan::{plan, PlanInputs};
pub use plan::{PackAction, PackPlan, PackReason};
pub use versions::Expired;

/// How prune may delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PruneMode {
    /// Under an exclusive lock: nobody else uses the repository, unused packs go at once.
    Exclusive,
    /// Under a prune lock, beside backups: packs are marked, and deleted by a later run.
    Beside {
        /// Seconds (storage time) a mark waits before it is acted on, and by which every lock
        /// still live must postdate it: more than the storage's clock skew and listing delay.
        grace_secs: i64,
    },
}

/// How to prune.
#[derive(Debug, Clone, Copy)]
pub struct PruneOptions {
    /// Repack a pack once more than this percentage of its bytes is unused.
    pub max_unused_percent: f64,
    /// Report what would be done, change nothing.
    pub dry_run: bool,
    /// Worker threads (marking).
    pub threads: usize,
    /// Exclusive or beside backups; the caller holds the matching lock.
    pub mode: PruneMode,
}

/// What prune did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default)]
pub struct PruneReport {
    /// Packs in the repository before.
    pub packs: usize,
    /// Packs deleted because nothing in them is used (or, beside backups, because an earlier
    /// run marked them and they are still not needed).
    pub packs_deleted: usize,
    /// Packs deleted because no index file names them (left by a backup that died).
    pub packs_unindexed: usize,
    /// Packs this run marked for deletion by a later one (beside backups).
    pub packs_marked: usize,
    /// Their bytes.
    pub bytes_marked: u64,
    /// Packs an earlier run marked that are needed again (a backup that started before the
    /// mark referred to them): kept, and no longer marked.
    pub packs_revived: usize,
    /// Marks of earlier runs not acted on yet, and why (the first reason).
    pub marks_waiting: usize,
    /// Why the first waiting mark waits.
    pub waiting_because: Option<String>,
    /// What the operator should know of a run that succeeded (leftovers not removed).
    pub notices: Vec<String>,
    /// Index files before.
    pub index_files_before: usize,
    /// Index files written (the index is rewritten whenever packs go, or there are many files).
    pub index_files_written: usize,
    /// Packs rewritten because too much of them is unused (their used blobs copied).
    pub packs_repacked: usize,
    /// New packs written by the repack.
    pub packs_written: usize,
    /// Blobs no snapshot refers to, dropped.
    pub blobs_dropped: usize,
    /// Bytes of used blobs copied into new packs.
    pub bytes_repacked: u64,
    /// Bytes of packs removed (deleted, and repacked once their copies were durable).
    pub bytes_removed: u64,
    /// Bytes of the new packs the repack wrote.
    pub bytes_written: u64,
    /// Net space given back in packs: removed minus written, never more than `bytes_before`.
    pub bytes_reclaimed: u64,
    /// Bytes in packs before (the leftovers below are not packs, and not counted here).
    pub bytes_before: u64,
    /// Bytes of leftovers of interrupted writes removed (temporary files of a backup that was
    /// killed), on top of what the packs gave back.
    pub bytes_leftovers: u64,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
    /// What happens to each pack, and why (in pack id order); filled in by a dry run only.
    pub plan: Vec<PackPlan>,
    /// Under Object Lock: the versions of gone objects deleted for good, and those still
    /// retained.
    pub versions: Option<Expired>,
}

/// Every blob the snapshots refer to (trees and data), those of snapshots pinned by a live
/// lock at `storage_now` (a server's, a changed-block backup's parent) included, forgotten or
/// not: a bit per row of the index. Fails on any snapshot or tree that cannot be read, and on a
/// blob the index does not know: pruning without knowing what a snapshot needs could delete
/// its data.
pub(crate) fn used_blobs(repo: &Repository, storage_now: i64) -> Result<Used> {
    let mut roots = Vec::new();
    for (id, manifest) in repo.snapshots()? {
        // Forgotten between the listing and the read (a forget beside us): nothing to keep.
        if let Err(StoreError::SnapshotNotFound(_)) = manifest {
            continue;
        }
        let manifest = manifest.map_err(|e| {
            EngineError::Unsafe(format!(
                "snapshot {id} cannot be read ({e}); prune needs every snapshot intact"
            ))
        })?;
        roots.push((id, manifest));
    }
    // Pins are listed after the snapshots: a server copies a manifest to its pin before it
    // checks that the snapshot still exists (Repository::pin_snapshot).
    let pinned = repo.pinned_snapshots(storage_now).map_err(|e| {
        EngineError::Unsafe(format!(
            "a pinned snapshot cannot be read ({e}); prune needs it intact"
        ))
    })?;
    for (id, manifest) in pinned {
        if !roots.iter().any(|(r, _)| *r == id) {
            roots.push((id, manifest));
        }
    }
    // Backups that finished since the index was loaded wrote their index files before their
    // manifests: refreshed now, the index knows every tree a listed snapshot has.
    repo.refresh_index()?;
    let index = repo.index()?;
    let rows = repo.index_rows()?;
    let scratch = index.cache_dir();
    // Every id of every root, looked up in id order, partition by partition (the table can be
    // far larger than memory); one record per id, naming a snapshot that uses it.
    let mut places = TreePlaces::new(&roots, |(_, m)| Some(m));
    let mut lookups = Lookups::new(&rows, scratch, true);
    for (n, (id, manifest)) in roots.iter().enumerate() {
        places.enter(repo, &rows, n)?;
        let tag = n as u64;
        for tree in &manifest.trees {
            lookups.push(*tree, tag)?;
        }
        for segments in windows(manifest) {
            let trees = places.trees(repo, manifest, segments).map_err(|e| {
                EngineError::Unsafe(format!(
                    "snapshot {id}: {e}; prune needs every snapshot intact"
                ))
            })?;
            for x in trees.into_iter().flatten() {
                if let Extent::Data { id, .. } = x {
                    lookups.push(id, tag)?;
                }
            }
        }
    }
    let mut bits = RowBits::new(rows.len(), scratch).map_err(|e| StoreError::io(scratch, e))?;
    lookups.resolve(|row, records| match row {
        Some(row) => {
            bits.set(row);
            Ok(())
        }
        None => {
            let (chunk, n) = records[0];
            Err(EngineError::Unsafe(format!(
                "chunk {chunk} of snapshot {} is in no index file; run `sbk verify`, then `sbk repair index`",
                roots[n as usize].0
            )))
        }
    })?;
    Ok(Used { rows, bits })
}

/// Runs prune. The caller holds `lock`: exclusive, or a prune lock for [`PruneMode::Beside`].
/// Computes the plan from the repository, then (unless a dry run) carries it out.
pub fn prune(
    repo: &Repository,
    lock: &Lock,
    opts: &PruneOptions,
    progress: &dyn Progress,
) -> Result<PruneReport> {
    let started = Instant::now();
    let pool = worker_pool(opts.threads, "prune")?;
    let earlier = sort_marks(repo, lock, opts.mode)?;
    // What the snapshots use comes first, the index files second, the packs last: a snapshot
    // is written after its index files and they after its packs, so every blob a listed
    // snapshot uses is in a listed index file and a listed pack.
    let used = pool.install(|| used_blobs(repo, lock.started()))?;
    let files = RepoIndexFiles {
        repo,
        files: repo.index_files()?,
    };
    let packs = Packs::new(repo.list_packs()?);
    let scratch = repo.index()?.cache_dir().to_owned();
    let live = liveness(&files, &used, &packs, &earlier, &scratch)?;
    drop(used);
    let plan = plan(
        &PlanInputs {
            files: &files,
            live: &live,
            earlier: &earlier,
            mode: opts.mode,
            max_unused_percent: opts.max_unused_percent,
        },
        packs,
    )?;
    let beside = matches!(opts.mode, PruneMode::Beside { .. });
    let (deleted, repacked) = (
        plan.acting(PackAction::Delete).count(),
        plan.acting(PackAction::Repack).count(),
    );
    let mut report = PruneReport {
        packs: plan.packs.len(),
        bytes_before: plan.packs.bytes(),
        index_files_before: files.count(),
        marks_waiting: earlier.waiting_objects,
        waiting_because: earlier.because.clone(),
        packs_marked: plan.packs_marked(),
        bytes_marked: plan.bytes_marked,
        packs_revived: plan.packs_revived,
        packs_unindexed: plan.packs_unindexed,
        packs_deleted: deleted - plan.packs_unindexed,
        packs_repacked: repacked,
        blobs_dropped: plan.blobs_dropped,
        bytes_repacked: plan.bytes_repacked,
        ..PruneReport::default()
    };
    if opts.dry_run {
        report.bytes_removed = plan
            .acting(PackAction::Delete)
            .map(|(_, size)| size)
            .sum::<u64>()
            + if beside {
                0
            } else {
                plan.acting(PackAction::Repack).map(|(_, size)| size).sum()
            };
        // The repack's new packs hold the used blobs it copies (their headers and trailers
        // are not counted: a dry run writes nothing to measure them by).
        report.bytes_written = report.bytes_repacked;
        report.bytes_reclaimed = report.bytes_removed.saturating_sub(report.bytes_written);
    } else {
        execute(
            repo,
            lock,
            &plan,
            &files,
            &live,
            &earlier,
            opts.mode,
            &mut report,
            progress,
        )?;
    }
    if repo.config().object_lock.is_some() {
        // The packs the index files name now, after this run replaced them.
        let now = RepoIndexFiles {
            repo,
            files: repo.index_files()?,
        };
        let mut indexed = HashSet::new();
        now.each(&mut |packs| {
            indexed.extend(packs.into_iter().map(|(p, _)| p.to_hex()));
            Ok(())
        })?;
        report.versions = versions::expire_versions(repo, opts.dry_run, &indexed)?;
        if let Some(v) = &report.versions {
            if let Some(why) = &v.refusal {
                report.notices.push(format!(
                    "the storage refused to delete {} old versions that carry no retention date (a legal hold, or a policy?): {why}",
                    v.refused
                ));
            }
        }
    }
    if opts.dry_run {
        // Only a dry run shows it: a list by pack is 64 bytes a pack (25 MB at 10^8 chunks).
        report.plan = plan.plans().collect();
    }
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// The repository's index files, read anew on each pass: the repository's own truth, not the
/// cache. A damaged index file could hide where a used blob lives, so prune stops on one.
struct RepoIndexFiles<'a> {
    repo: &'a Repository,
    files: BTreeSet<IndexId>,
}

impl RepoIndexFiles<'_> {
    /// The index files' names.
    pub(super) fn names(&self) -> &BTreeSet<IndexId> {
        &self.files
    }
}

impl IndexFiles for RepoIndexFiles<'_> {
    fn count(&self) -> usize {
        self.files.len()
    }

    fn each(&self, f: &mut dyn FnMut(Vec<(PackId, Vec<PackEntry>)>) -> Result<()>) -> Result<()> {
        for id in &self.files {
            let file = self.repo.read_index_file(id).map_err(|e| {
                EngineError::Unsafe(format!(
                    "{e}; prune needs every index file intact: run `sbk repair index` first"
                ))
            })?;
            f(file.packs)?;
        }
        Ok(())
    }
}
