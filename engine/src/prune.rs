//! `prune`: mark and sweep. Removes the packs that hold only blobs no snapshot refers to, and
//! repacks those whose unused share exceeds a threshold.
//!
//! Two modes (docs/design.md, "prune"). Beside backups (a prune lock, the default), in two
//! phases: a run *marks* the packs it would delete (a marks object), and a later run deletes
//! the marked packs that are still not needed, once the grace period has passed and every lock
//! taken before the mark is gone; backups never dedup against a marked pack. Under an
//! exclusive lock nobody else uses the repository, and unused packs go at once.
//!
//! Ordering, in both: blobs that stay are copied into new packs, which are sealed (durable)
//! first; then new index files naming every surviving and new pack are written, and only then
//! are the old index files removed; only then are packs deleted. A crash at any point leaves
//! every snapshot restorable: at worst extra packs (named by no index file, swept by a later
//! prune), index files naming a blob twice, or a marks object naming packs that are gone.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use sbk_store::{
    pack_size_of, ChunkId, Extent, Lock, LockKind, MarkReason, Marks, PackEntry, PackId,
    Repository, StoreError, BLOB_HEADER_LEN,
};

use crate::error::{EngineError, Result};
use crate::packer::Packer;
use crate::pool::{snapshot_trees, worker_pool};
use crate::progress::Progress;
use crate::repair::replace_index_files;
use crate::restore::windows;

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
    /// Bytes of packs (and leftovers of interrupted writes) removed.
    pub bytes_removed: u64,
    /// Net space given back: removed minus written.
    pub bytes_reclaimed: u64,
    /// Bytes in packs before.
    pub bytes_before: u64,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
}

/// Every blob id the snapshots refer to (trees and data), those of snapshots pinned by a live
/// lock at `storage_now` (a server's, a changed-block backup's parent) included, forgotten or
/// not. Fails on any snapshot or tree that cannot be
/// read: pruning without knowing what a snapshot needs could delete its data.
pub fn used_blobs(repo: &Repository, storage_now: i64) -> Result<HashSet<ChunkId>> {
    let mut used = HashSet::new();
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
    for (id, manifest) in roots {
        used.extend(manifest.trees.iter().copied());
        for segments in windows(&manifest) {
            let trees = snapshot_trees(repo, &manifest, segments).map_err(|e| {
                EngineError::Unsafe(format!(
                    "snapshot {id}: {e}; prune needs every snapshot intact"
                ))
            })?;
            used.extend(trees.into_iter().flatten().filter_map(|x| match x {
                Extent::Data { id, .. } => Some(id),
                Extent::Zero { .. } => None,
            }));
        }
    }
    Ok(used)
}

/// Prune merges the index files whenever there are more than this many, even if it deletes
/// nothing (each backup run writes at least one).
const MERGE_INDEX_FILES_AT: usize = 16;

/// What the marks objects of earlier runs allow.
#[derive(Default)]
struct EarlierMarks {
    /// Marked packs this run may delete (when still not needed), with the reason.
    due: HashMap<PackId, MarkReason>,
    /// Marked packs whose mark waits.
    waiting: HashSet<PackId>,
    /// Names of the marks objects this run acts on (removed at its end).
    consumed: Vec<String>,
    /// How many marks objects wait, and why the first does.
    waiting_objects: usize,
    because: Option<String>,
    /// Leftovers of interrupted writes last written before this (storage time) are nobody's:
    /// older than every live lock but ours and pins (a pin's holder writes only small objects,
    /// done in moments), and than the grace period. Under an exclusive lock, all of them. (A
    /// process that takes its lock after the listing this comes from writes nothing older than
    /// our own lock.)
    leftovers_before: i64,
}

/// Sorts the marks objects into those this run acts on and those that wait. A mark is acted on
/// once `grace` has passed since the storage wrote it and every live lock but ours and pins was
/// taken more than `grace` after it (storage times both): a process that took its lock later
/// read the mark before it could dedup against a marked pack. In exclusive mode every mark is
/// consumed: nobody else is there to honour it.
fn sort_marks(repo: &Repository, lock: &Lock, mode: PruneMode) -> Result<EarlierMarks> {
    let mut out = EarlierMarks {
        leftovers_before: i64::MAX,
        ..EarlierMarks::default()
    };
    let found = repo.list_marks()?;
    let PruneMode::Beside { grace_secs } = mode else {
        for m in found {
            if let Ok(marks) = m.marks {
                out.due.extend(marks.packs);
            }
            out.consumed.push(m.name);
        }
        return Ok(out);
    };
    // Marks first, locks second; no marks object appears meanwhile (prune locks exclude each
    // other), and a lock taken after this listing postdates every mark.
    let others = live_others(repo, lock)?;
    // Our own lock's time is the storage's "now".
    let now = lock.started();
    out.leftovers_before = others
        .iter()
        .map(|l| l.started())
        .min()
        .unwrap_or(i64::MAX)
        .min(now - grace_secs);
    for m in found {
        let marks = m.marks.map_err(|e| {
            EngineError::Unsafe(format!(
                "{e}; which packs it marks is unknown: run `sbk prune --exclusive` when no backup runs"
            ))
        })?;
        let age = now - m.modified;
        let wait = if age < grace_secs {
            Some(format!(
                "marked {age} s ago; the grace period is {grace_secs} s"
            ))
        } else {
            // One second more than the grace: storage times have one-second resolution, and
            // an object's time is when its write began, a moment before it can be listed.
            others
                .iter()
                .find(|l| l.started() <= m.modified + grace_secs + 1)
                .map(|l| match &l.info {
                    Ok(i) => format!(
                        "{} lock of process {} on {} ({}) was taken before the mark",
                        i.kind.article(),
                        i.pid,
                        i.host,
                        i.purpose
                    ),
                    Err(e) => format!("lock {} cannot be read ({e})", l.name),
                })
        };
        match wait {
            Some(why) => {
                out.waiting.extend(marks.packs.iter().map(|(p, _)| *p));
                out.waiting_objects += 1;
                out.because.get_or_insert(why);
            }
            None => {
                out.due.extend(marks.packs);
                out.consumed.push(m.name);
            }
        }
    }
    // A pack in a waiting mark waits, whatever another mark says.
    out.due.retain(|p, _| !out.waiting.contains(p));
    Ok(out)
}

/// Runs prune. The caller holds `lock`: exclusive, or a prune lock for [`PruneMode::Beside`].
pub fn prune(
    repo: &Repository,
    lock: &Lock,
    opts: &PruneOptions,
    progress: &dyn Progress,
) -> Result<PruneReport> {
    let started = Instant::now();
    let pool = worker_pool(opts.threads, "prune")?;
    let mut report = PruneReport::default();
    let beside = matches!(opts.mode, PruneMode::Beside { .. });
    let earlier = sort_marks(repo, lock, opts.mode)?;
    report.marks_waiting = earlier.waiting_objects;
    report.waiting_because = earlier.because.clone();

    // What the snapshots use comes first, the index files second, the packs last: a snapshot
    // is written after its index files and they after its packs, so every blob a listed
    // snapshot uses is in a listed index file and a listed pack.
    let used = pool.install(|| used_blobs(repo, lock.started()))?;

    // What the index files say each pack holds: the repository's own truth, not the cache. A
    // damaged index file could hide where a used blob lives, so prune stops on one.
    let files = repo.index_files()?;
    report.index_files_before = files.len();
    let mut indexed: HashMap<PackId, Vec<PackEntry>> = HashMap::new();
    for f in &files {
        let file = repo.read_index_file(f).map_err(|e| {
            EngineError::Unsafe(format!(
                "{e}; prune needs every index file intact: run `sbk repair index` first"
            ))
        })?;
        for (pack, entries) in file.packs {
            let known = indexed.entry(pack).or_default();
            let seen: HashSet<ChunkId> = known.iter().map(|e| e.id).collect();
            known.extend(entries.into_iter().filter(|e| !seen.contains(&e.id)));
        }
    }
    let sizes: HashMap<PackId, u64> = repo.list_packs()?.into_iter().collect();
    report.packs = sizes.len();
    report.bytes_before = sizes.values().sum();

    // One existing pack for each used blob: one no mark names if there is one, then one whose
    // mark waits, then one due for deletion (which that revives). A used blob in no existing
    // pack means the index files or the packs are damaged, and nothing may be deleted until
    // that is repaired.
    let rank = |p: &PackId| {
        if earlier.due.contains_key(p) {
            2
        } else if earlier.waiting.contains(p) {
            1
        } else {
            0
        }
    };
    let mut home: HashMap<ChunkId, PackId> = HashMap::new();
    let mut by_id: Vec<(&PackId, &Vec<PackEntry>)> = indexed.iter().collect();
    by_id.sort_by_key(|(p, _)| (rank(p), **p));
    for (pack, entries) in &by_id {
        if sizes.contains_key(pack) {
            for e in entries.iter() {
                if used.contains(&e.id) {
                    home.entry(e.id).or_insert(**pack);
                }
            }
        }
    }
    if let Some(id) = used.iter().find(|id| !home.contains_key(id)) {
        return Err(EngineError::Unsafe(format!(
            "chunk {id} is used but no index file names an existing pack holding it; run `sbk verify`, then `sbk repair index`"
        )));
    }
    let mut live_in: HashMap<PackId, HashSet<ChunkId>> = HashMap::new();
    for (id, pack) in &home {
        live_in.entry(*pack).or_default().insert(*id);
    }

    // Phase 2 (beside backups): the packs earlier runs marked that are due and still not
    // needed go now. One that is the home of a used blob was referred to by a backup that
    // started before its mark: it stays, unmarked.
    let mut delete: Vec<(PackId, u64)> = Vec::new();
    if beside {
        let mut due: Vec<(&PackId, &MarkReason)> = earlier.due.iter().collect();
        due.sort_by_key(|(p, _)| **p);
        for (pack, reason) in due {
            let Some(&size) = sizes.get(pack) else {
                continue; // deleted by a run that stopped before removing its marks
            };
            if live_in.contains_key(pack) {
                report.packs_revived += 1;
                continue;
            }
            if *reason == MarkReason::Unindexed && !indexed.contains_key(pack) {
                report.packs_unindexed += 1;
            }
            if let Some(entries) = indexed.get(pack) {
                report.blobs_dropped += entries.iter().filter(|e| !used.contains(&e.id)).count();
            }
            delete.push((*pack, size));
        }
    }
    let deleting: HashSet<PackId> = delete.iter().map(|(p, _)| *p).collect();

    // Phase 1 (or the whole plan, under an exclusive lock), pack by pack.
    let mut marks = Marks::default();
    let mut repack: Vec<(PackId, u64, Vec<PackEntry>)> = Vec::new();
    let mut survivors: Vec<(PackId, Vec<PackEntry>)> = Vec::new();
    let mut ids: Vec<(&PackId, &u64)> = sizes.iter().collect();
    ids.sort();
    for (pack, &size) in ids {
        if deleting.contains(pack) {
            continue;
        }
        let entries = indexed.get(pack);
        if beside && earlier.waiting.contains(pack) {
            // Marked already; the run that acts on its mark decides.
            if let Some(entries) = entries {
                survivors.push((*pack, entries.clone()));
            }
            continue;
        }
        let Some(entries) = entries else {
            // Named by no index file: left by a backup that died before indexing it, or (beside
            // backups) being written by one that runs; its lock then holds the mark back.
            if beside {
                marks.packs.push((*pack, MarkReason::Unindexed));
                report.bytes_marked += size;
            } else {
                report.packs_unindexed += 1;
                delete.push((*pack, size));
            }
            continue;
        };
        let live = live_in.get(pack);
        let (keep, drop): (Vec<PackEntry>, Vec<PackEntry>) = entries
            .iter()
            .partition(|e| live.is_some_and(|l| l.contains(&e.id)));
        if keep.is_empty() {
            if beside {
                marks.packs.push((*pack, MarkReason::Unused));
                report.bytes_marked += size;
                // Still indexed until it is deleted: a backup that started before the mark and
                // refers to it finds it, and revives it.
                survivors.push((*pack, entries.clone()));
            } else {
                report.blobs_dropped += drop.len();
                delete.push((*pack, size));
            }
            continue;
        }
        let live_bytes: u64 = keep.iter().map(blob_bytes).sum();
        let unused = 100.0 * (1.0 - live_bytes as f64 / size as f64);
        // Blobs no index file names any more (a repacked pack revived, or a run stopped between
        // re-indexing and marking) are unused too, though `drop` does not list them.
        let named: u64 = entries.iter().map(blob_bytes).sum();
        let unnamed = size > pack_size_of(entries.len(), named) + 64;
        if (!drop.is_empty() || unnamed) && unused > opts.max_unused_percent {
            report.bytes_repacked += live_bytes;
            if beside {
                marks.packs.push((*pack, MarkReason::Repacked));
                report.bytes_marked += size;
                // Indexed with its unused blobs only: the used ones are found in their new
                // pack (a backup then dedups against that copy, never the marked one), and a
                // backup older than the mark that refers to an unused one revives the pack.
                if !drop.is_empty() {
                    survivors.push((*pack, drop.clone()));
                }
            } else {
                report.blobs_dropped += drop.len();
            }
            repack.push((*pack, size, keep));
        } else {
            survivors.push((*pack, entries.clone()));
        }
    }
    report.packs_marked = marks.packs.len();
    report.packs_deleted = delete.len() - report.packs_unindexed;
    report.packs_repacked = repack.len();
    let changes = !delete.is_empty() || !repack.is_empty();
    let rewrite_index =
        changes || files.len() > MERGE_INDEX_FILES_AT || indexed.len() > survivors.len();
    if opts.dry_run {
        report.bytes_removed = delete.iter().map(|(_, size)| size).sum::<u64>()
            + if beside {
                0
            } else {
                repack.iter().map(|(_, size, _)| size).sum()
            };
        report.bytes_reclaimed = report.bytes_removed.saturating_sub(report.bytes_repacked);
        report.duration_ms = started.elapsed().as_millis() as u64;
        return Ok(report);
    }

    // A stop is honoured between steps: each leaves the repository as a crash there would,
    // which the ordering below makes safe (new packs unindexed until step 2, old packs named by
    // no index after it; a later prune removes either).
    crate::interrupt::check()?;
    // 1. Copy the blobs that stay into new packs, verified, and seal them (durable).
    let packer = Packer::new(repo).recording();
    copy_live(&packer, repo, &repack, progress)?;
    let new_packs = packer.sealed_packs();
    let written = packer.packed_bytes();
    report.packs_written = new_packs.len();

    // 2. New index files naming the surviving and new packs, then the old index files go: from
    //    here on no process can find a blob in a pack about to be deleted.
    crate::interrupt::check()?;
    if rewrite_index {
        let mut all = survivors;
        all.extend(new_packs);
        // The packer's own index files name the new packs too: replaced with the rest.
        let mut old = files.clone();
        old.extend(packer.index_files());
        report.index_files_written = replace_index_files(repo, &all, &old)?.0;
    }

    // 3. The marks of this run, once the copies of repacked blobs are indexed: backups that
    //    start from now on leave the marked packs alone.
    crate::interrupt::check()?;
    if !marks.packs.is_empty() {
        repo.write_marks(&marks)?;
    }

    // 4. Only now delete packs, then the marks this run acted on, then the leftovers of
    //    interrupted writes that no live process can still be writing.
    let mut doomed = delete;
    if !beside {
        doomed.extend(repack.iter().map(|(p, size, _)| (*p, *size)));
    }
    for (pack, size) in doomed {
        crate::interrupt::check()?;
        report.bytes_removed += repo.remove_pack(pack, size)?;
    }
    for name in &earlier.consumed {
        repo.remove_marks(name)?;
    }
    // Best effort: what is left of interrupted writes costs space, never correctness, and a
    // storage that cannot list it (or fails to) must not fail a prune that did its work.
    match repo.remove_leftovers(earlier.leftovers_before) {
        Ok(freed) => report.bytes_removed += freed,
        Err(e) => report.notices.push(format!(
            "leftovers of interrupted writes were not removed: {e}"
        )),
    }
    // Pins of processes that are gone protect nothing any more.
    repo.remove_stale_pins(lock.started())?;
    report.bytes_reclaimed = report.bytes_removed.saturating_sub(written);
    report.duration_ms = started.elapsed().as_millis() as u64;
    Ok(report)
}

/// The locks but ours and pins that may still be held ([`sbk_store::FoundLock::live`], at our
/// own lock's storage time: no host's clock decides it, since taking a live backup for gone
/// could delete what it refers to). A server's reads that find a pack gone refresh the index
/// and read on: pins do not count.
fn live_others(repo: &Repository, lock: &Lock) -> Result<Vec<sbk_store::FoundLock>> {
    Ok(repo
        .live_locks(lock.started())?
        .into_iter()
        .filter(|l| l.name != lock.name())
        .filter(|l| l.info.as_ref().map_or(true, |i| i.kind != LockKind::Pin))
        .collect())
}

/// A blob's bytes in its pack, header included.
fn blob_bytes(e: &PackEntry) -> u64 {
    BLOB_HEADER_LEN as u64 + u64::from(e.stored_len)
}

/// Copies the live blobs of the packs to repack into new packs through a [`Packer`], each blob
/// verified before it is written (prune never spreads a damaged blob), and flushes it: the new
/// packs are durable and named by the packer's own index files when this returns.
fn copy_live(
    packer: &Packer<'_>,
    repo: &Repository,
    repack: &[(PackId, u64, Vec<PackEntry>)],
    progress: &dyn Progress,
) -> Result<()> {
    let total = repack
        .iter()
        .flat_map(|(_, _, keep)| keep)
        .map(blob_bytes)
        .sum();
    progress.start(0, "repack", total);
    let (mut buf, mut scratch) = (Vec::new(), Vec::new());
    for (pack, _, keep) in repack {
        crate::interrupt::check()?;
        repo.read_pack_blobs(*pack, keep, &mut buf, |_, blob| -> Result<()> {
            let blob = blob?.verified_copy(&mut scratch)?;
            let n = packer.add(std::slice::from_ref(&blob))?;
            progress.advance(0, n);
            Ok(())
        })?;
    }
    packer.flush()?;
    progress.finish(0);
    Ok(())
}
