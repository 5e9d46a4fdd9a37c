//! Which copy of each used blob prune keeps: what the snapshots use, entry by entry of the
//! index files (by ordinal in the passes over them), in a few bits per blob and per entry.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use sbk_store::{ChunkId, PackEntry, PackId, RowBits, Rows};

use super::marks::EarlierMarks;
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

impl Used {
    /// The row of each entry of an index file (its packs' entries in turn) whose blob is used:
    /// looked up sorted, in one pass over the index table, rather than one binary search each
    /// (at 10^7 blobs and more the table is larger than a memory limit lets stay cached).
    fn rows_of(&self, packs: &[(PackId, Vec<PackEntry>)]) -> Vec<Option<u64>> {
        let mut ids: Vec<(ChunkId, usize)> = packs
            .iter()
            .flat_map(|(_, list)| list.iter().map(|e| e.id))
            .enumerate()
            .map(|(i, id)| (id, i))
            .collect();
        ids.sort_unstable();
        let sorted: Vec<ChunkId> = ids.iter().map(|(id, _)| *id).collect();
        let mut out = vec![None; ids.len()];
        self.rows.rows_sorted(&sorted, |i, row| {
            out[ids[i].1] = row.filter(|r| self.bits.get(*r));
        });
        out
    }
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

/// Computes [`Liveness`] in two passes over the index files: the best rank of an existing pack
/// holding each used blob, then the first entry of that rank claims it. Fails when a used blob
/// is in no existing pack: the index files or the packs are damaged, and nothing may be deleted
/// until that is repaired. Memory: a few bits per blob and per entry.
pub(crate) fn liveness(
    files: &dyn IndexFiles,
    used: &Used,
    sizes: &HashMap<PackId, u64>,
    earlier: &EarlierMarks,
    scratch: &Path,
) -> Result<Liveness> {
    let io = |e| EngineError::from(sbk_store::StoreError::io(scratch, e));
    let n = used.rows.len();
    // Per used blob: held by an existing pack at all, by one of rank 0, by one of rank 1.
    let (mut held, mut r0, mut r1) = (
        RowBits::new(n, scratch).map_err(io)?,
        RowBits::new(n, scratch).map_err(io)?,
        RowBits::new(n, scratch).map_err(io)?,
    );
    let mut files_naming: HashMap<PackId, u32> = HashMap::new();
    let mut entries = 0u64;
    files.each(&mut |packs| {
        let mut rows = used.rows_of(&packs).into_iter();
        for (pack, list) in &packs {
            *files_naming.entry(*pack).or_default() += 1;
            entries += list.len() as u64;
            let list_rows: Vec<Option<u64>> = rows.by_ref().take(list.len()).collect();
            if !sizes.contains_key(pack) {
                continue;
            }
            let rank = rank(earlier, pack);
            for r in list_rows.into_iter().flatten() {
                held.set(r);
                match rank {
                    0 => r0.set(r),
                    1 => r1.set(r),
                    _ => false,
                };
            }
        }
        Ok(())
    })?;
    if let Some(r) = (0..n).find(|r| used.bits.get(*r) && !held.get(*r)) {
        let id = used
            .rows
            .entry(r)
            .map(|e| e.entry.id.to_string())
            .unwrap_or_default();
        return Err(EngineError::Unsafe(format!(
            "chunk {id} is used but no index file names an existing pack holding it; run `sbk verify`, then `sbk repair index`"
        )));
    }
    drop(held);
    let mut live = Liveness {
        used: RowBits::new(entries, scratch).map_err(io)?,
        home: RowBits::new(entries, scratch).map_err(io)?,
        named: files_naming.len(),
        split: files_naming
            .into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|(p, _)| p)
            .collect(),
    };
    let mut claimed = RowBits::new(n, scratch).map_err(io)?;
    let mut k = 0u64;
    files.each(&mut |packs| {
        let mut rows = used.rows_of(&packs).into_iter();
        for (pack, list) in &packs {
            let exists = sizes.contains_key(pack);
            let rank = rank(earlier, pack);
            for row in rows.by_ref().take(list.len()) {
                if let Some(r) = row {
                    live.used.set(k);
                    let best = if r0.get(r) {
                        0
                    } else if r1.get(r) {
                        1
                    } else {
                        2
                    };
                    if exists && rank == best && !claimed.set(r) {
                        live.home.set(k);
                    }
                }
                k += 1;
            }
        }
        Ok(())
    })?;
    Ok(live)
}
