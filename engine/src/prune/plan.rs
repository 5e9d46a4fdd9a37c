//! The prune plan: what to keep, mark, revive, repack and delete, pack by pack, and why. A pure
//! function of what the index files name, the packs that exist, the blobs the snapshots use and
//! the marks of earlier runs; it reads and writes nothing, so a dry run prints it and the
//! executor carries it out unchanged.

use std::collections::{HashMap, HashSet};
use std::fmt;

use sbk_store::{pack_size_of, ChunkId, MarkReason, Marks, PackEntry, PackId, BLOB_HEADER_LEN};

use super::marks::EarlierMarks;
use super::PruneMode;
use crate::error::{EngineError, Result};

/// Prune merges the index files whenever there are more than this many, even if it deletes
/// nothing (each backup run writes at least one).
const MERGE_INDEX_FILES_AT: usize = 16;

/// What prune does with one pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackAction {
    /// It stays as it is.
    Keep,
    /// It is marked for a later run to delete (beside backups).
    Mark,
    /// An earlier run marked it, but it is needed again: it stays, unmarked.
    Revive,
    /// Its used blobs are copied into new packs; it is then deleted (exclusive) or marked.
    Repack,
    /// It is deleted by this run.
    Delete,
}

impl fmt::Display for PackAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PackAction::Keep => "keep",
            PackAction::Mark => "mark",
            PackAction::Revive => "revive",
            PackAction::Repack => "repack",
            PackAction::Delete => "delete",
        })
    }
}

/// Why prune does what it does with a pack.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PackReason {
    /// It holds blobs that snapshots use, and not enough unused bytes to be worth repacking.
    Used,
    /// An earlier run marked it, and that mark is not due yet (the grace period, or a lock
    /// taken before the mark).
    MarkWaits,
    /// No index file names it: a backup died before indexing it, or one still writes it.
    Unindexed,
    /// No snapshot uses any blob in it.
    Unused,
    /// More of its bytes than the threshold are unused.
    MostlyUnused {
        /// The unused share of its bytes, in percent.
        percent: f64,
    },
    /// An earlier run marked it for this reason, the mark is due, and it is still not needed.
    MarkDue(MarkReason),
    /// An earlier run marked it, but a backup that started before the mark refers to it.
    NeededAgain,
}

impl fmt::Display for PackReason {
    /// One word, for `PACK ACTION REASON BYTES` lines.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PackReason::Used => f.write_str("used"),
            PackReason::MarkWaits => f.write_str("mark-waits"),
            PackReason::Unindexed => f.write_str("unindexed"),
            PackReason::Unused => f.write_str("unused"),
            PackReason::MostlyUnused { percent } => write!(f, "{percent:.0}%-unused"),
            PackReason::MarkDue(MarkReason::Unused) => f.write_str("marked-unused"),
            PackReason::MarkDue(MarkReason::Unindexed) => f.write_str("marked-unindexed"),
            PackReason::MarkDue(MarkReason::Repacked) => f.write_str("marked-repacked"),
            PackReason::NeededAgain => f.write_str("needed-again"),
        }
    }
}

/// The plan for one pack.
#[derive(Debug, Clone, PartialEq)]
pub struct PackPlan {
    /// The pack.
    pub pack: PackId,
    /// What happens to it.
    pub action: PackAction,
    /// Why.
    pub reason: PackReason,
    /// Its size.
    pub bytes: u64,
}

/// What prune will do.
#[derive(Debug, Default)]
pub(crate) struct PrunePlan {
    /// Every pack that exists, in id order, with what happens to it.
    pub packs: Vec<PackPlan>,
    /// Packs this run deletes, with their sizes (repacked ones are in `repack`).
    pub delete: Vec<(PackId, u64)>,
    /// Packs whose used blobs (`Vec<PackEntry>`) are copied into new packs, with their sizes.
    pub repack: Vec<(PackId, u64, Vec<PackEntry>)>,
    /// What the new index files name of the packs that stay.
    pub survivors: Vec<(PackId, Vec<PackEntry>)>,
    /// The marks this run writes.
    pub marks: Marks,
    /// Whether the index files are rewritten.
    pub rewrite_index: bool,
    /// Packs deleted because no index file names them.
    pub packs_unindexed: usize,
    /// Marked packs needed again.
    pub packs_revived: usize,
    /// Bytes of the packs marked.
    pub bytes_marked: u64,
    /// Blobs no snapshot refers to, dropped.
    pub blobs_dropped: usize,
    /// Bytes of used blobs copied into new packs.
    pub bytes_repacked: u64,
}

/// What the index files name, by pack.
pub(crate) type IndexedPacks = HashMap<PackId, Vec<PackEntry>>;

/// What the plan is computed from.
pub(crate) struct PlanInputs<'a> {
    /// What the index files name, by pack (each blob once per pack).
    pub indexed: &'a IndexedPacks,
    /// The packs that exist, with their sizes.
    pub sizes: &'a HashMap<PackId, u64>,
    /// Every blob a snapshot (or a pin) uses.
    pub used: &'a HashSet<ChunkId>,
    /// The marks of earlier runs, sorted into due and waiting.
    pub earlier: &'a EarlierMarks,
    /// Index files in the repository.
    pub index_files: usize,
    /// Exclusive, or beside backups.
    pub mode: PruneMode,
    /// Repack a pack once more than this percentage of its bytes is unused.
    pub max_unused_percent: f64,
}

/// A blob's bytes in its pack, header included.
pub(crate) fn blob_bytes(e: &PackEntry) -> u64 {
    BLOB_HEADER_LEN as u64 + u64::from(e.stored_len)
}

impl PrunePlan {
    fn note(&mut self, pack: PackId, action: PackAction, reason: PackReason, bytes: u64) {
        self.packs.push(PackPlan {
            pack,
            action,
            reason,
            bytes,
        });
    }

    /// Packs marked by this run.
    pub fn packs_marked(&self) -> usize {
        self.marks.packs.len()
    }
}

/// Computes the plan. Fails when a used blob is in no existing pack: the index files or the
/// packs are damaged, and nothing may be deleted until that is repaired.
pub(crate) fn plan(i: &PlanInputs<'_>) -> Result<PrunePlan> {
    let beside = matches!(i.mode, PruneMode::Beside { .. });
    let live_in = homes(i)?;
    let mut p = PrunePlan::default();
    let mut ids: Vec<(&PackId, &u64)> = i.sizes.iter().collect();
    ids.sort();
    for (pack, &size) in ids {
        let entries = i.indexed.get(pack);
        if beside {
            if let Some(reason) = i.earlier.due.get(pack) {
                // Due: deleted unless a backup that started before the mark refers to it; then
                // it stays, unmarked, and is weighed like any other pack below.
                if !live_in.contains_key(pack) {
                    if *reason == MarkReason::Unindexed && entries.is_none() {
                        p.packs_unindexed += 1;
                    }
                    if let Some(entries) = entries {
                        p.blobs_dropped +=
                            entries.iter().filter(|e| !i.used.contains(&e.id)).count();
                    }
                    p.delete.push((*pack, size));
                    p.note(
                        *pack,
                        PackAction::Delete,
                        PackReason::MarkDue(*reason),
                        size,
                    );
                    continue;
                }
                p.packs_revived += 1;
            } else if i.earlier.waiting.contains(pack) {
                // Marked already; the run that acts on its mark decides.
                if let Some(entries) = entries {
                    p.survivors.push((*pack, entries.clone()));
                }
                p.note(*pack, PackAction::Keep, PackReason::MarkWaits, size);
                continue;
            }
        }
        let revived = beside && i.earlier.due.contains_key(pack);
        weigh(i, &mut p, *pack, size, entries, live_in.get(pack), revived);
    }
    let changes = !p.delete.is_empty() || !p.repack.is_empty();
    p.rewrite_index =
        changes || i.index_files > MERGE_INDEX_FILES_AT || i.indexed.len() > p.survivors.len();
    Ok(p)
}

/// One existing pack for each used blob, and the used blobs of each such pack: a pack no mark
/// names if there is one, then one whose mark waits, then one due for deletion (which that
/// revives).
fn homes(i: &PlanInputs<'_>) -> Result<HashMap<PackId, HashSet<ChunkId>>> {
    let rank = |p: &PackId| {
        if i.earlier.due.contains_key(p) {
            2
        } else if i.earlier.waiting.contains(p) {
            1
        } else {
            0
        }
    };
    let mut home: HashMap<ChunkId, PackId> = HashMap::new();
    let mut by_rank: Vec<(&PackId, &Vec<PackEntry>)> = i.indexed.iter().collect();
    by_rank.sort_by_key(|(p, _)| (rank(p), **p));
    for (pack, entries) in by_rank {
        if i.sizes.contains_key(pack) {
            for e in entries {
                if i.used.contains(&e.id) {
                    home.entry(e.id).or_insert(*pack);
                }
            }
        }
    }
    if let Some(id) = i.used.iter().find(|id| !home.contains_key(id)) {
        return Err(EngineError::Unsafe(format!(
            "chunk {id} is used but no index file names an existing pack holding it; run `sbk verify`, then `sbk repair index`"
        )));
    }
    let mut live_in: HashMap<PackId, HashSet<ChunkId>> = HashMap::new();
    for (id, pack) in home {
        live_in.entry(pack).or_default().insert(id);
    }
    Ok(live_in)
}

/// Decides a pack that no due or waiting mark settles: kept, marked, repacked or deleted.
fn weigh(
    i: &PlanInputs<'_>,
    p: &mut PrunePlan,
    pack: PackId,
    size: u64,
    entries: Option<&Vec<PackEntry>>,
    live: Option<&HashSet<ChunkId>>,
    revived: bool,
) {
    let beside = matches!(i.mode, PruneMode::Beside { .. });
    let Some(entries) = entries else {
        // Named by no index file: left by a backup that died before indexing it, or (beside
        // backups) being written by one that runs; its lock then holds the mark back.
        if beside {
            p.marks.packs.push((pack, MarkReason::Unindexed));
            p.bytes_marked += size;
            p.note(pack, PackAction::Mark, PackReason::Unindexed, size);
        } else {
            p.packs_unindexed += 1;
            p.delete.push((pack, size));
            p.note(pack, PackAction::Delete, PackReason::Unindexed, size);
        }
        return;
    };
    let (mut keep, drop): (Vec<PackEntry>, Vec<PackEntry>) = entries
        .iter()
        .partition(|e| live.is_some_and(|l| l.contains(&e.id)));
    // In pack order, as the read path reads them (index files merged in any order name them in
    // any order).
    keep.sort_by_key(|e| e.offset);
    if keep.is_empty() {
        if beside {
            p.marks.packs.push((pack, MarkReason::Unused));
            p.bytes_marked += size;
            // Still indexed until it is deleted: a backup that started before the mark and
            // refers to it finds it, and revives it.
            p.survivors.push((pack, entries.clone()));
            p.note(pack, PackAction::Mark, PackReason::Unused, size);
        } else {
            p.blobs_dropped += drop.len();
            p.delete.push((pack, size));
            p.note(pack, PackAction::Delete, PackReason::Unused, size);
        }
        return;
    }
    let live_bytes: u64 = keep.iter().map(blob_bytes).sum();
    let unused = 100.0 * (1.0 - live_bytes as f64 / size as f64);
    // Blobs no index file names any more (a repacked pack revived, or a run stopped between
    // re-indexing and marking) are unused too, though `drop` does not list them.
    let named: u64 = entries.iter().map(blob_bytes).sum();
    let unnamed = size > pack_size_of(entries.len(), named) + 64;
    if (drop.is_empty() && !unnamed) || unused <= i.max_unused_percent {
        p.survivors.push((pack, entries.clone()));
        let (action, reason) = if revived {
            (PackAction::Revive, PackReason::NeededAgain)
        } else {
            (PackAction::Keep, PackReason::Used)
        };
        p.note(pack, action, reason, size);
        return;
    }
    p.bytes_repacked += live_bytes;
    if beside {
        p.marks.packs.push((pack, MarkReason::Repacked));
        p.bytes_marked += size;
        // Indexed with its unused blobs only: the used ones are found in their new pack (a
        // backup then dedups against that copy, never the marked one), and a backup older than
        // the mark that refers to an unused one revives the pack.
        if !drop.is_empty() {
            p.survivors.push((pack, drop));
        }
    } else {
        p.blobs_dropped += drop.len();
    }
    p.repack.push((pack, size, keep));
    p.note(
        pack,
        PackAction::Repack,
        PackReason::MostlyUnused { percent: unused },
        size,
    );
}
