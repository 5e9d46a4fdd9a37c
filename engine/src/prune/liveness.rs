//! Which copy of each used blob prune keeps: what the snapshots use, entry by entry of the
//! index files (by ordinal in the passes over them), in a few bits per blob and per entry.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use sbk_store::{Lookups, PackEntry, PackId, RowBits, RowCounts, Rows};

use super::marks::EarlierMarks;
use super::packs::Packs;
use crate::error::{EngineError, Result};

/// The index files prune reads, one at a time and in the same order on every pass: each as
/// the packs it names with their entries. Entry `k` of a pass (counting every entry of every
/// file in turn) is "ordinal `k`" to [`Liveness`].
pub(crate) trait IndexFiles {
    /// How many index files there are.
    fn count(&self) -> usize;
    /// Calls `f` with each file's packs, in order.
    fn each(&self, f: &mut dyn FnMut(Vec<(PackId, Vec<PackEntry>)>) -> Result<()>) -> Result<()>;
}

/// Every blob a snapshot (or a pin) uses: a bit per row of the index.
pub(crate) struct Used {
    /// The numbering of the index's blobs the bits follow.
    pub rows: Rows,
    /// Set for the rows of used blobs.
    pub bits: RowBits,
}

/// What the snapshots use, entry by entry of the index files (by ordinal): whether its blob is
/// used, and whether this entry is its *home*, the one copy prune keeps: in an existing pack
/// no mark names if there is one, then in one whose mark waits, then in one due for deletion
/// (which that revives).
pub(crate) struct Liveness {
    pub(super) used: RowBits,
    pub(super) home: RowBits,
    /// Packs more than one index file names.
    pub(super) split: HashSet<PackId>,
    /// Packs the index files name.
    pub(super) named: usize,
}

/// The rank of a pack as a home: lower is better.
fn rank(earlier: &EarlierMarks, p: &PackId) -> u8 {
    if earlier.due.contains_key(p) {
        2
    } else if earlier.waiting.contains(p) {
        1
    } else {
        0
    }
}

/// Computes [`Liveness`] in one pass over the index files: each entry's id is looked up in
/// id order, partition by partition ([`Lookups`]: the table can be far larger than memory), so
/// that all the copies of a blob come together; of those in existing packs, the first entry
/// of the best rank is its home. Fails when a used blob is in no existing pack: the index files
/// or the packs are damaged, and nothing may be deleted until that is repaired. Memory: a few
/// bits per blob and per entry, two words per pack an index file names, one run of lookups.
pub(crate) fn liveness(
    files: &dyn IndexFiles,
    used: &Used,
    packs: &Packs,
    earlier: &EarlierMarks,
    scratch: &Path,
) -> Result<Liveness> {
    let io = |e| EngineError::from(sbk_store::StoreError::io(scratch, e));
    // Each pack of each file in pass order: its first entry's ordinal, whether it exists, its
    // rank.
    let mut spans: Vec<(u64, bool, u8)> = Vec::new();
    // How many files name each pack: by row for those that exist, by id for those that do
    // not (a pack lost, or deleted by a prune that stopped before rewriting the index).
    let mut naming = RowCounts::new(packs.len() as u64, scratch).map_err(io)?;
    let mut naming_gone: HashMap<PackId, u64> = HashMap::new();
    let (mut named, mut split) = (0, HashSet::new());
    let mut lookups = Lookups::new(&used.rows, scratch, false);
    let mut entries = 0u64;
    files.each(&mut |list_of_packs| {
        for (pack, list) in &list_of_packs {
            let row = packs.row(pack);
            let n = match row {
                Some(r) => naming.add(r as u64, 1),
                None => {
                    let n = naming_gone.entry(*pack).or_default();
                    *n += 1;
                    *n
                }
            };
            match n {
                1 => named += 1,
                2 => {
                    split.insert(*pack);
                }
                _ => {}
            }
            spans.push((entries, row.is_some(), rank(earlier, pack)));
            for e in list {
                lookups.push(e.id, entries)?;
                entries += 1;
            }
        }
        Ok(())
    })?;
    drop((naming, naming_gone));
    let mut live = Liveness {
        used: RowBits::new(entries, scratch).map_err(io)?,
        home: RowBits::new(entries, scratch).map_err(io)?,
        named,
        split,
    };
    // Per used blob: held by an existing pack.
    let mut held = RowBits::new(used.rows.len(), scratch).map_err(io)?;
    let span = |k: u64| spans[spans.partition_point(|s| s.0 <= k) - 1];
    lookups.resolve::<EngineError>(|row, copies| {
        let Some(r) = row.filter(|r| used.bits.get(*r)) else {
            return Ok(());
        };
        // Copies come in ordinal order: strictly better ranks replace the home, so the first
        // of the best rank keeps it.
        let mut home: Option<(u8, u64)> = None;
        for &(_, k) in copies {
            live.used.set(k);
            let (_, exists, rank) = span(k);
            if exists && home.is_none_or(|(best, _)| rank < best) {
                home = Some((rank, k));
            }
        }
        if let Some((_, k)) = home {
            held.set(r);
            live.home.set(k);
        }
        Ok(())
    })?;
    if let Some(r) = (0..used.rows.len()).find(|r| used.bits.get(*r) && !held.get(*r)) {
        let id = used
            .rows
            .entry(r)
            .map(|e| e.entry.id.to_string())
            .unwrap_or_default();
        return Err(EngineError::Unsafe(format!(
            "chunk {id} is used but no index file names an existing pack holding it; run `sbk verify`, then `sbk repair index`"
        )));
    }
    Ok(live)
}
