//! The prune plan: what to keep, mark, revive, repack and delete, pack by pack, and why. A pure
//! function of what the index files name, the packs that exist, the blobs the snapshots use and
//! the marks of earlier runs; it reads and writes nothing, so a dry run prints it and the
//! executor carries it out unchanged.

use std::collections::HashMap;
use std::fmt;

use sbk_store::{pack_size_of, ChunkId, MarkReason, Marks, PackEntry, PackId, BLOB_HEADER_LEN};

use super::liveness::{IndexFiles, Liveness};
use super::marks::EarlierMarks;
use super::packs::Packs;
use super::PruneMode;
use crate::error::Result;

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
        /// The unused share of its bytes, in percent (f32: the plan holds one reason per
        /// pack, and a printed percentage needs no more).
        percent: f32,
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

/// What becomes of a pack that stays named by the index, or whose blobs are copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    /// The new index files name it as the old ones do.
    Keep,
    /// Its used blobs are copied into new packs; beside backups the new index files still
    /// name its unused ones (`name_unused`).
    Repack {
        /// Whether the new index files name its unused blobs.
        name_unused: bool,
    },
}

/// What prune will do. Entries are not kept per pack (that would be the whole index in
/// memory): what the executor needs of them is read again from the index files, with
/// [`Liveness`] ([`survivors`], [`kept`]). What it decides of each pack is kept by the pack's
/// row in [`Packs`], a few bytes a pack.
#[derive(Debug)]
pub(crate) struct PrunePlan {
    /// Every pack that exists, in id order.
    pub packs: Packs,
    /// What happens to each pack and why, by row (`None` until decided).
    decisions: Vec<Option<(PackAction, PackReason)>>,
    /// What the new index files make of each pack, by row: `None` for a pack they do not
    /// name and whose blobs are not copied.
    fate: Vec<Option<Fate>>,
    /// Packs more than one old index file names, merged (decided, and later named, from this
    /// rather than from the files).
    merged: HashMap<PackId, Named>,
    /// Packs the new index files name.
    survivors: usize,
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

/// What the plan is computed from.
pub(crate) struct PlanInputs<'a> {
    /// The index files.
    pub files: &'a dyn IndexFiles,
    /// What the snapshots use of what they name.
    pub live: &'a Liveness,
    /// The marks of earlier runs, sorted into due and waiting.
    pub earlier: &'a EarlierMarks,
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
    /// An empty plan over `packs`: nothing decided yet.
    fn new(packs: Packs) -> PrunePlan {
        PrunePlan {
            decisions: vec![None; packs.len()],
            fate: vec![None; packs.len()],
            packs,
            merged: HashMap::new(),
            survivors: 0,
            marks: Marks::default(),
            rewrite_index: false,
            packs_unindexed: 0,
            packs_revived: 0,
            bytes_marked: 0,
            blobs_dropped: 0,
            bytes_repacked: 0,
        }
    }

    fn note(&mut self, row: usize, action: PackAction, reason: PackReason) {
        let decision = &mut self.decisions[row];
        debug_assert!(decision.is_none(), "pack row {row} decided twice");
        *decision = Some((action, reason));
    }

    /// Every pack that exists, in id order, with what happens to it.
    pub fn plans(&self) -> impl Iterator<Item = PackPlan> + '_ {
        self.decisions.iter().enumerate().filter_map(|(row, d)| {
            let (pack, bytes) = self.packs.at(row);
            d.map(|(action, reason)| PackPlan {
                pack,
                action,
                reason,
                bytes,
            })
        })
    }

    /// The packs with this action, with their sizes, in id order: `Delete` for those this run
    /// deletes (repacked ones are `Repack`), `Repack` for those whose used blobs are copied
    /// into new packs.
    pub fn acting(&self, action: PackAction) -> impl Iterator<Item = (PackId, u64)> + '_ {
        self.decisions
            .iter()
            .enumerate()
            .filter(move |(_, d)| d.is_some_and(|(a, _)| a == action))
            .map(|(row, _)| self.packs.at(row))
    }

    /// What the new index files make of a pack (`None`: they do not name it, and its blobs
    /// are not copied).
    pub fn fate(&self, pack: &PackId) -> Option<Fate> {
        self.fate[self.packs.row(pack)?]
    }

    /// Packs marked by this run.
    pub fn packs_marked(&self) -> usize {
        self.marks.packs.len()
    }

    /// A pack survives as the old index files name it.
    fn survive(&mut self, row: usize) {
        self.fate[row] = Some(Fate::Keep);
        self.survivors += 1;
    }
}

/// A pack's entries as the index files name them, each with whether it is used and whether
/// it is its blob's home.
#[derive(Debug, Default)]
struct Named {
    entries: Vec<PackEntry>,
    used: Vec<bool>,
    home: Vec<bool>,
}

impl Named {
    /// `entries`, the first of them entry ordinal `k`.
    fn at(entries: Vec<PackEntry>, live: &Liveness, k: u64) -> Named {
        let n = entries.len() as u64;
        Named {
            used: (k..k + n).map(|x| live.used.get(x)).collect(),
            home: (k..k + n).map(|x| live.home.get(x)).collect(),
            entries,
        }
    }

    /// Adds the entries of `other` not named yet (a blob is home if either says so).
    fn merge(&mut self, other: Named) {
        let mut at: HashMap<ChunkId, usize> = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.id, i))
            .collect();
        for (j, e) in other.entries.iter().enumerate() {
            match at.get(&e.id).copied() {
                Some(i) => self.home[i] |= other.home[j],
                None => {
                    at.insert(e.id, self.entries.len());
                    self.entries.push(*e);
                    self.used.push(other.used[j]);
                    self.home.push(other.home[j]);
                }
            }
        }
    }

    /// The entries that are (`true`) or are not (`false`) their blob's home.
    fn homes(&self, home: bool) -> Vec<PackEntry> {
        self.entries
            .iter()
            .zip(&self.home)
            .filter(|(_, h)| **h == home)
            .map(|(e, _)| *e)
            .collect()
    }
}

/// Computes the plan in one pass over the index files (packs several of them name are merged
/// and decided after it), then decides the packs no index file names.
pub(crate) fn plan(i: &PlanInputs<'_>, packs: Packs) -> Result<PrunePlan> {
    let mut p = PrunePlan::new(packs);
    let mut k = 0u64;
    i.files.each(&mut |packs| {
        for (pack, entries) in packs {
            let n = entries.len() as u64;
            let named = Named::at(entries, i.live, k);
            k += n;
            if i.live.split.contains(&pack) {
                p.merged.entry(pack).or_default().merge(named);
            } else if let Some(row) = p.packs.row(&pack) {
                decide(i, &mut p, row, Some(&named));
            }
        }
        Ok(())
    })?;
    let mut merged: Vec<(PackId, Named)> = std::mem::take(&mut p.merged).into_iter().collect();
    merged.sort_by_key(|(pack, _)| *pack);
    for (pack, named) in &merged {
        if let Some(row) = p.packs.row(pack) {
            decide(i, &mut p, row, Some(named));
        }
    }
    p.merged = merged.into_iter().collect();
    // The packs no index file names, in id order.
    for row in 0..p.packs.len() {
        if p.decisions[row].is_none() {
            decide(i, &mut p, row, None);
        }
    }
    let changes = p.acting(PackAction::Delete).next().is_some()
        || p.acting(PackAction::Repack).next().is_some();
    p.rewrite_index = changes
        || i.files.count() > MERGE_INDEX_FILES_AT
        || i.live.named > p.survivors
        || !i.live.split.is_empty();
    Ok(p)
}

/// Decides the existing pack of `row`, from what the index files name of it (`None`:
/// nothing).
fn decide(i: &PlanInputs<'_>, p: &mut PrunePlan, row: usize, named: Option<&Named>) {
    let pack = p.packs.at(row).0;
    let beside = matches!(i.mode, PruneMode::Beside { .. });
    let is_home = named.is_some_and(|n| n.home.iter().any(|h| *h));
    if beside {
        if let Some(reason) = i.earlier.due.get(&pack) {
            // Due: deleted unless a backup that started before the mark refers to it; then it
            // stays, unmarked, and is weighed like any other pack below.
            if !is_home {
                if *reason == MarkReason::Unindexed && named.is_none() {
                    p.packs_unindexed += 1;
                }
                if let Some(n) = named {
                    p.blobs_dropped += n.used.iter().filter(|u| !**u).count();
                }
                p.note(row, PackAction::Delete, PackReason::MarkDue(*reason));
                return;
            }
            p.packs_revived += 1;
        } else if i.earlier.waiting.contains(&pack) {
            // Marked already; the run that acts on its mark decides.
            if named.is_some() {
                p.survive(row);
            }
            p.note(row, PackAction::Keep, PackReason::MarkWaits);
            return;
        }
    }
    let revived = beside && i.earlier.due.contains_key(&pack);
    weigh(i, p, row, named, revived);
}

/// Decides a pack that no due or waiting mark settles: kept, marked, repacked or deleted.
fn weigh(i: &PlanInputs<'_>, p: &mut PrunePlan, row: usize, named: Option<&Named>, revived: bool) {
    let (pack, size) = p.packs.at(row);
    let beside = matches!(i.mode, PruneMode::Beside { .. });
    let Some(named) = named else {
        // Named by no index file: left by a backup that died before indexing it, or (beside
        // backups) being written by one that runs; its lock then holds the mark back.
        if beside {
            p.marks.packs.push((pack, MarkReason::Unindexed));
            p.bytes_marked += size;
            p.note(row, PackAction::Mark, PackReason::Unindexed);
        } else {
            p.packs_unindexed += 1;
            p.note(row, PackAction::Delete, PackReason::Unindexed);
        }
        return;
    };
    let entries = &named.entries;
    let (keep, drop) = (named.homes(true), named.homes(false));
    if keep.is_empty() {
        if beside {
            p.marks.packs.push((pack, MarkReason::Unused));
            p.bytes_marked += size;
            // Still indexed until it is deleted: a backup that started before the mark and
            // refers to it finds it, and revives it.
            p.survive(row);
            p.note(row, PackAction::Mark, PackReason::Unused);
        } else {
            p.blobs_dropped += drop.len();
            p.note(row, PackAction::Delete, PackReason::Unused);
        }
        return;
    }
    let live_bytes: u64 = keep.iter().map(blob_bytes).sum();
    let unused = 100.0 * (1.0 - live_bytes as f64 / size as f64);
    // Blobs no index file names any more (a repacked pack revived, or a run stopped between
    // re-indexing and marking) are unused too, though `drop` does not list them.
    let named_bytes: u64 = entries.iter().map(blob_bytes).sum();
    let unnamed = size > pack_size_of(entries.len(), named_bytes) + 64;
    if (drop.is_empty() && !unnamed) || unused <= i.max_unused_percent {
        p.survive(row);
        let (action, reason) = if revived {
            (PackAction::Revive, PackReason::NeededAgain)
        } else {
            (PackAction::Keep, PackReason::Used)
        };
        p.note(row, action, reason);
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
            p.survivors += 1;
        }
    } else {
        p.blobs_dropped += drop.len();
    }
    p.fate[row] = Some(Fate::Repack {
        name_unused: beside,
    });
    p.note(
        row,
        PackAction::Repack,
        PackReason::MostlyUnused {
            percent: unused as f32,
        },
    );
}

/// Calls `f` once with each pack the plan keeps or repacks, as the index files name it (read
/// once more, one at a time; merged packs last).
fn walk(
    plan: &PrunePlan,
    files: &dyn IndexFiles,
    live: &Liveness,
    f: &mut dyn FnMut(PackId, Fate, &Named) -> Result<()>,
) -> Result<()> {
    let mut k = 0u64;
    files.each(&mut |packs| {
        for (pack, entries) in packs {
            let n = entries.len() as u64;
            if !live.split.contains(&pack) {
                if let Some(fate) = plan.fate(&pack) {
                    f(pack, fate, &Named::at(entries, live, k))?;
                }
            }
            k += n;
        }
        Ok(())
    })?;
    let mut merged: Vec<(&PackId, &Named)> = plan.merged.iter().collect();
    merged.sort_by_key(|(pack, _)| **pack);
    for (pack, named) in merged {
        if let Some(fate) = plan.fate(pack) {
            f(*pack, fate, named)?;
        }
    }
    Ok(())
}

/// What the new index files name of the packs that stay: those kept whole as the old index
/// files name them, and the unused blobs of those repacked beside backups. `f` is called with
/// one pack at a time.
pub(crate) fn survivors(
    plan: &PrunePlan,
    files: &dyn IndexFiles,
    live: &Liveness,
    f: &mut dyn FnMut(PackId, Vec<PackEntry>) -> Result<()>,
) -> Result<()> {
    walk(plan, files, live, &mut |pack, fate, named| match fate {
        Fate::Keep => f(pack, named.entries.clone()),
        Fate::Repack { name_unused: true } => {
            let unused = named.homes(false);
            if unused.is_empty() {
                Ok(())
            } else {
                f(pack, unused)
            }
        }
        Fate::Repack { name_unused: false } => Ok(()),
    })
}

/// The used blobs of each pack to repack, in pack order (as the read path reads them; index
/// files merged in any order name them in any order). `f` is called with one pack at a time.
pub(crate) fn kept(
    plan: &PrunePlan,
    files: &dyn IndexFiles,
    live: &Liveness,
    f: &mut dyn FnMut(PackId, Vec<PackEntry>) -> Result<()>,
) -> Result<()> {
    walk(plan, files, live, &mut |pack, fate, named| {
        if let Fate::Repack { .. } = fate {
            let mut keep = named.homes(true);
            keep.sort_by_key(|e| e.offset);
            f(pack, keep)?;
        }
        Ok(())
    })
}
