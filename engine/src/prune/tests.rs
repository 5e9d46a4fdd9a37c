//! The prune plan over hand-built inputs: one or more tests for each reason a pack is kept,
//! marked, revived, repacked or deleted.

use std::collections::{HashMap, HashSet};

use sbk_store::{
    pack_size_of, BlobKind, ChunkId, Compression, IndexEntry, MarkReason, PackEntry, PackId,
    RowBits, Rows, BLOB_HEADER_LEN,
};

use super::liveness::{liveness, IndexFiles, Liveness, Used};
use super::marks::EarlierMarks;
use super::packs::Packs;
use super::plan::{kept, plan, survivors, PlanInputs, PrunePlan};
use super::{PackAction, PackReason, PruneMode};
use crate::error::Result;

const BESIDE: PruneMode = PruneMode::Beside { grace_secs: 600 };

fn pack(n: u8) -> PackId {
    PackId([n; 16])
}

fn chunk(n: u8) -> ChunkId {
    ChunkId([n; 32])
}

/// A repository described by hand: packs of blobs (each 1000 stored bytes), which of them the
/// index files name, which blobs snapshots use, and earlier marks.
#[derive(Default)]
struct Repo {
    /// One index file naming these packs, in this order.
    indexed: Vec<(PackId, Vec<PackEntry>)>,
    /// More index files (naming packs the first one names too).
    more_files: Vec<Vec<(PackId, Vec<PackEntry>)>>,
    sizes: HashMap<PackId, u64>,
    used: HashSet<ChunkId>,
    earlier: EarlierMarks,
    index_files: usize,
}

impl Repo {
    /// A pack holding `blobs`, named by an index file.
    fn pack(mut self, p: u8, blobs: &[u8]) -> Self {
        self = self.unindexed_pack(p, blobs);
        let mut offset = 16;
        let entries = blobs
            .iter()
            .map(|&b| {
                let e = PackEntry {
                    id: chunk(b),
                    kind: BlobKind::Data,
                    compression: Compression::None,
                    offset,
                    stored_len: 1000,
                    raw_len: 1000,
                };
                offset = e.end();
                e
            })
            .collect();
        self.indexed.push((pack(p), entries));
        self
    }

    /// A pack that exists but no index file names.
    fn unindexed_pack(mut self, p: u8, blobs: &[u8]) -> Self {
        let stored = blobs.len() as u64 * (BLOB_HEADER_LEN as u64 + 1000);
        self.sizes
            .insert(pack(p), pack_size_of(blobs.len(), stored));
        self
    }

    /// One more index file naming pack `p` with the entries of these of its blobs (as a prune
    /// that stopped after writing its new index files leaves them).
    fn also_named(mut self, p: u8, blobs: &[u8]) -> Self {
        let (_, entries) = self.indexed.iter().find(|(x, _)| *x == pack(p)).unwrap();
        let some = entries
            .iter()
            .filter(|e| blobs.iter().any(|b| e.id == chunk(*b)))
            .copied()
            .collect();
        self.more_files.push(vec![(pack(p), some)]);
        self
    }

    fn used(mut self, blobs: &[u8]) -> Self {
        self.used.extend(blobs.iter().map(|&b| chunk(b)));
        self
    }

    fn due(mut self, p: u8, reason: MarkReason) -> Self {
        self.earlier.due.insert(pack(p), reason);
        self
    }

    fn waiting(mut self, p: u8) -> Self {
        self.earlier.waiting.insert(pack(p));
        self
    }

    fn plan(&self, mode: PruneMode) -> Planned {
        self.try_plan(mode).expect("a plan")
    }

    fn files(&self) -> Files {
        let mut files = vec![self.indexed.clone()];
        files.extend(self.more_files.iter().cloned());
        Files {
            count: self.index_files.max(files.len()),
            files,
        }
    }

    /// The plan, as prune computes it: the used blobs marked by row, then what each index
    /// entry is to them.
    fn try_plan(&self, mode: PruneMode) -> Result<Planned> {
        let scratch = std::env::temp_dir();
        let mut entries: Vec<IndexEntry> = self
            .indexed
            .iter()
            .flat_map(|(p, list)| {
                list.iter().map(|e| IndexEntry {
                    pack: *p,
                    entry: *e,
                })
            })
            .collect();
        // Used blobs no index file names still have a row (the cache may know them).
        entries.extend(self.used.iter().map(|id| IndexEntry {
            pack: pack(0),
            entry: PackEntry {
                id: *id,
                kind: BlobKind::Data,
                compression: Compression::None,
                offset: 16,
                stored_len: 1000,
                raw_len: 1000,
            },
        }));
        let rows = Rows::in_memory(entries);
        let mut bits = RowBits::new(rows.len(), &scratch).unwrap();
        for id in &self.used {
            bits.set(rows.row(id).unwrap());
        }
        let used = Used { rows, bits };
        let files = self.files();
        let packs = Packs::new(self.sizes.iter().map(|(p, size)| (*p, *size)).collect());
        let live = liveness(&files, &used, &packs, &self.earlier, &scratch)?;
        let plan = plan(
            &PlanInputs {
                files: &files,
                live: &live,
                earlier: &self.earlier,
                mode,
                max_unused_percent: 10.0,
            },
            packs,
        )?;
        Ok(Planned { plan, live })
    }

    /// The blobs the new index files name in pack `p`, if they name it.
    fn survivor(&self, planned: &Planned, p: u8) -> Option<Vec<ChunkId>> {
        let mut found = None;
        survivors(planned, &self.files(), &planned.live, &mut |x, entries| {
            if x == pack(p) {
                assert!(found.is_none(), "pack {p} named twice");
                found = Some(entries.iter().map(|e| e.id).collect());
            }
            Ok(())
        })
        .unwrap();
        found
    }

    /// The blobs of pack `p` the repack copies, in the order it copies them.
    fn kept(&self, planned: &Planned, p: u8) -> Vec<PackEntry> {
        let mut found = Vec::new();
        kept(planned, &self.files(), &planned.live, &mut |x, keep| {
            if x == pack(p) {
                found.extend(keep);
            }
            Ok(())
        })
        .unwrap();
        found
    }
}

/// A plan with what it was computed from, as the executor gets it.
struct Planned {
    plan: PrunePlan,
    live: Liveness,
}

impl std::ops::Deref for Planned {
    type Target = PrunePlan;
    fn deref(&self) -> &PrunePlan {
        &self.plan
    }
}

/// Index files by hand, counted as `count`.
struct Files {
    files: Vec<Vec<(PackId, Vec<PackEntry>)>>,
    count: usize,
}

impl IndexFiles for Files {
    fn count(&self) -> usize {
        self.count
    }

    fn each(&self, f: &mut dyn FnMut(Vec<(PackId, Vec<PackEntry>)>) -> Result<()>) -> Result<()> {
        self.files.iter().try_for_each(|packs| f(packs.clone()))
    }
}

/// What the plan does with pack `p`, and why.
fn verdict(plan: &Planned, p: u8) -> (PackAction, PackReason) {
    let found = plan
        .plans()
        .find(|x| x.pack == pack(p))
        .unwrap_or_else(|| panic!("pack {p} is in the plan"));
    (found.action, found.reason)
}

#[test]
fn a_pack_whose_blobs_are_used_is_kept() {
    let r = Repo::default().pack(1, &[1, 2]).used(&[1, 2]);
    for mode in [PruneMode::Exclusive, BESIDE] {
        let p = r.plan(mode);
        assert_eq!(verdict(&p, 1), (PackAction::Keep, PackReason::Used));
        assert!(
            p.acting(PackAction::Delete).next().is_none()
                && p.acting(PackAction::Repack).next().is_none()
                && p.marks.packs.is_empty()
        );
        assert_eq!(r.survivor(&p, 1), Some(vec![chunk(1), chunk(2)]));
    }
}

#[test]
fn a_pack_with_few_unused_bytes_is_kept_whole() {
    // One blob of thirty unused: with the pack's own header and trailer, about 8% of its bytes,
    // under the 10% threshold.
    let blobs: Vec<u8> = (1..=30).collect();
    let r = Repo::default().pack(1, &blobs).used(&blobs[1..]);
    let p = r.plan(PruneMode::Exclusive);
    assert_eq!(verdict(&p, 1), (PackAction::Keep, PackReason::Used));
    assert_eq!(p.blobs_dropped, 0);
}

#[test]
fn an_unused_pack_is_deleted_under_an_exclusive_lock() {
    let r = Repo::default().pack(1, &[1]).pack(2, &[2, 3]).used(&[1]);
    let p = r.plan(PruneMode::Exclusive);
    assert_eq!(verdict(&p, 2), (PackAction::Delete, PackReason::Unused));
    assert_eq!(
        p.acting(PackAction::Delete).collect::<Vec<_>>(),
        vec![(pack(2), r.sizes[&pack(2)])]
    );
    assert_eq!(p.blobs_dropped, 2);
    assert!(p.rewrite_index, "the deleted pack leaves the index");
    assert_eq!(r.survivor(&p, 2), None);
}

#[test]
fn an_unused_pack_is_marked_beside_backups_and_stays_indexed() {
    let r = Repo::default().pack(1, &[1]).pack(2, &[2]).used(&[1]);
    let p = r.plan(BESIDE);
    assert_eq!(verdict(&p, 2), (PackAction::Mark, PackReason::Unused));
    assert!(p.acting(PackAction::Delete).next().is_none());
    assert_eq!(p.marks.packs, vec![(pack(2), MarkReason::Unused)]);
    assert_eq!(p.bytes_marked, r.sizes[&pack(2)]);
    // A backup older than the mark may refer to it: it must still find it.
    assert_eq!(r.survivor(&p, 2), Some(vec![chunk(2)]));
}

#[test]
fn an_unindexed_pack_is_deleted_under_an_exclusive_lock_and_marked_beside_backups() {
    let r = Repo::default()
        .pack(1, &[1])
        .unindexed_pack(2, &[2])
        .used(&[1]);
    let p = r.plan(PruneMode::Exclusive);
    assert_eq!(verdict(&p, 2), (PackAction::Delete, PackReason::Unindexed));
    assert_eq!(p.packs_unindexed, 1);
    // Beside backups it may be one a running backup is still writing: its lock holds the mark.
    let p = r.plan(BESIDE);
    assert_eq!(verdict(&p, 2), (PackAction::Mark, PackReason::Unindexed));
    assert_eq!(p.marks.packs, vec![(pack(2), MarkReason::Unindexed)]);
    assert_eq!(p.packs_unindexed, 0);
}

#[test]
fn a_mostly_unused_pack_is_repacked() {
    let r = Repo::default().pack(1, &[1, 2, 3, 4]).used(&[1]);
    let p = r.plan(PruneMode::Exclusive);
    let (action, reason) = verdict(&p, 1);
    assert_eq!(action, PackAction::Repack);
    let PackReason::MostlyUnused { percent } = reason else {
        panic!("{reason:?}")
    };
    // Three blobs of four, and the trailer.
    assert!((75.0..80.0).contains(&percent), "{percent}");
    assert_eq!(p.acting(PackAction::Repack).count(), 1);
    let kept: Vec<ChunkId> = r.kept(&p, 1).iter().map(|e| e.id).collect();
    assert_eq!(kept, vec![chunk(1)], "only used blobs are copied");
    assert_eq!(p.blobs_dropped, 3);
    assert_eq!(p.bytes_repacked, BLOB_HEADER_LEN as u64 + 1000);
    assert!(p.marks.packs.is_empty());
}

#[test]
fn used_blobs_are_copied_in_pack_order_whatever_order_the_index_names_them_in() {
    // Index files merged in any order can name a pack's blobs in any order.
    let mut r = Repo::default().pack(1, &[1, 2, 3, 4, 5]).used(&[4, 1]);
    r.indexed[0].1.reverse();
    let p = r.plan(PruneMode::Exclusive);
    let offsets: Vec<u64> = r.kept(&p, 1).iter().map(|e| e.offset).collect();
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
    assert_eq!(offsets.len(), 2);
}

#[test]
fn a_mostly_unused_pack_is_repacked_and_marked_beside_backups() {
    let r = Repo::default().pack(1, &[1, 2, 3, 4]).used(&[1]);
    let p = r.plan(BESIDE);
    assert_eq!(verdict(&p, 1).0, PackAction::Repack);
    assert_eq!(p.marks.packs, vec![(pack(1), MarkReason::Repacked)]);
    // Indexed with its unused blobs only: backups dedup against the copy of the used one.
    assert_eq!(r.survivor(&p, 1), Some(vec![chunk(2), chunk(3), chunk(4)]));
}

#[test]
fn a_pack_holding_blobs_no_index_names_is_repacked() {
    // The pack holds three blobs, the index names one (a revived repacked pack).
    let mut r = Repo::default().pack(1, &[1]).used(&[1]);
    r = r.unindexed_pack(1, &[1, 2, 3]);
    let p = r.plan(PruneMode::Exclusive);
    assert_eq!(verdict(&p, 1).0, PackAction::Repack);
}

#[test]
fn a_due_mark_deletes_a_pack_still_not_needed() {
    for reason in [
        MarkReason::Unused,
        MarkReason::Unindexed,
        MarkReason::Repacked,
    ] {
        let r = Repo::default()
            .pack(1, &[1])
            .pack(2, &[2])
            .used(&[1])
            .due(2, reason);
        let p = r.plan(BESIDE);
        assert_eq!(
            verdict(&p, 2),
            (PackAction::Delete, PackReason::MarkDue(reason))
        );
        assert_eq!(
            p.acting(PackAction::Delete).collect::<Vec<_>>(),
            vec![(pack(2), r.sizes[&pack(2)])]
        );
        assert!(p.marks.packs.is_empty(), "nothing is marked twice");
    }
    // An unindexed pack whose mark is due counts as unindexed.
    let r = Repo::default()
        .pack(1, &[1])
        .unindexed_pack(2, &[2])
        .used(&[1])
        .due(2, MarkReason::Unindexed);
    let p = r.plan(BESIDE);
    assert_eq!(p.packs_unindexed, 1);
}

#[test]
fn a_due_pack_that_a_backup_refers_to_again_is_revived() {
    let r = Repo::default()
        .pack(1, &[1])
        .pack(2, &[2])
        .used(&[1, 2])
        .due(2, MarkReason::Unused);
    let p = r.plan(BESIDE);
    assert_eq!(
        verdict(&p, 2),
        (PackAction::Revive, PackReason::NeededAgain)
    );
    assert_eq!(p.packs_revived, 1);
    assert!(p.acting(PackAction::Delete).next().is_none());
    assert_eq!(r.survivor(&p, 2), Some(vec![chunk(2)]));
}

#[test]
fn a_used_blob_found_elsewhere_does_not_revive_a_due_pack() {
    // Blob 2 was repacked into pack 3: the marked original goes.
    let r = Repo::default()
        .pack(2, &[2, 9])
        .pack(3, &[2])
        .used(&[2])
        .due(2, MarkReason::Repacked);
    let p = r.plan(BESIDE);
    assert_eq!(
        verdict(&p, 2),
        (
            PackAction::Delete,
            PackReason::MarkDue(MarkReason::Repacked)
        )
    );
    assert_eq!(verdict(&p, 3), (PackAction::Keep, PackReason::Used));
    // Its home is the pack whose mark waits rather than the one due.
    let r = Repo::default()
        .pack(2, &[2])
        .pack(3, &[2])
        .used(&[2])
        .due(2, MarkReason::Repacked)
        .waiting(3);
    let p = r.plan(BESIDE);
    assert_eq!(verdict(&p, 2).0, PackAction::Delete);
    assert_eq!(verdict(&p, 3), (PackAction::Keep, PackReason::MarkWaits));
}

#[test]
fn a_pack_whose_mark_waits_is_kept_as_it_is() {
    let r = Repo::default()
        .pack(1, &[1])
        .pack(2, &[2])
        .used(&[1])
        .waiting(2);
    let p = r.plan(BESIDE);
    assert_eq!(verdict(&p, 2), (PackAction::Keep, PackReason::MarkWaits));
    assert!(p.marks.packs.is_empty() && p.acting(PackAction::Delete).next().is_none());
    assert_eq!(r.survivor(&p, 2), Some(vec![chunk(2)]));
}

#[test]
fn a_used_blob_in_no_existing_pack_stops_the_plan() {
    let r = Repo::default().pack(1, &[1]).used(&[1, 7]);
    let Err(e) = r.try_plan(PruneMode::Exclusive) else {
        panic!("a plan despite a used blob in no pack")
    };
    assert!(e.to_string().contains("repair index"), "{e}");
}

#[test]
fn many_index_files_are_merged_even_when_nothing_changes() {
    let mut r = Repo::default().pack(1, &[1]).used(&[1]);
    assert!(!r.plan(PruneMode::Exclusive).rewrite_index);
    r.index_files = 17;
    assert!(r.plan(PruneMode::Exclusive).rewrite_index);
}

#[test]
fn the_plan_lists_every_pack_once_in_id_order() {
    let r = Repo::default()
        .pack(3, &[3])
        .pack(1, &[1])
        .unindexed_pack(2, &[2])
        .used(&[1]);
    let p = r.plan(BESIDE);
    let order: Vec<PackId> = p.plans().map(|x| x.pack).collect();
    assert_eq!(order, vec![pack(1), pack(2), pack(3)]);
    assert!(p.plans().all(|x| x.bytes == r.sizes[&x.pack]));
}

#[test]
fn a_pack_two_index_files_name_is_decided_once_from_both_and_named_once() {
    let r = Repo::default()
        .pack(1, &[1, 2, 3])
        .also_named(1, &[3])
        .pack(2, &[4])
        .also_named(2, &[4])
        .used(&[1, 2, 3]);
    for mode in [PruneMode::Exclusive, BESIDE] {
        let p = r.plan(mode);
        assert_eq!(verdict(&p, 1), (PackAction::Keep, PackReason::Used));
        assert_eq!(
            r.survivor(&p, 1),
            Some(vec![chunk(1), chunk(2), chunk(3)]),
            "each blob once"
        );
        assert!(p.rewrite_index, "the index files are merged");
        // A second decision of a pack fails a debug assertion in the plan itself.
        assert_eq!(p.plans().count(), 2, "each pack decided");
    }
    let p = r.plan(PruneMode::Exclusive);
    assert_eq!(verdict(&p, 2), (PackAction::Delete, PackReason::Unused));
    assert_eq!(r.survivor(&p, 2), None);
}
