//! Dense facts per blob: a frozen numbering of the index's blobs ([`Rows`]: row r is the r-th
//! blob of the sorted cache table, then the overlay's in id order), a bit per row
//! ([`RowBits`]) and a counter per row ([`RowCounts`]: rows of any sorted list, the packs
//! too). Commands that need one fact per chunk of the repository (prune's marks,
//! stats' sharing) keep it here, in bits, instead of in a hash map keyed by 32-byte ids: at
//! 10^8 chunks a bit per row is 12.5 MB, a `HashSet<ChunkId>` about 5 GB.
//!
//! Row numbers and counts are 64-bit throughout (1 PiB of 256 KiB chunks is 2^32 rows). An
//! array larger than [`HEAP_MAX_BYTES`] lives in an unlinked, sparse scratch file in the cache
//! folder, memory-mapped: its pages are file pages the kernel can write back and reclaim under
//! a memory limit, where heap pages would have to stay.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use memmap2::MmapMut;

use super::table::Table;
use super::IndexEntry;
use crate::id::ChunkId;

/// Bit and counter arrays up to this size stay on the heap (2^25 rows of bits: 3.4 x 10^7
/// chunks); larger ones go to a scratch file. Small, because a command holds several (prune
/// four bit arrays at once): at 10^8 rows, 50 MB of heap that the kernel could not reclaim
/// under a memory limit.
pub const HEAP_MAX_BYTES: u64 = 4 << 20;
/// A mapped array asks the kernel to write its dirty pages back after this many word writes,
/// so that they do not pile up against a memory limit (cgroup v1 counts dirty mapped pages
/// until they are written back).
const FLUSH_EVERY: u64 = 1 << 22;

/// A frozen numbering of the blobs of an [`Index`](super::Index): taken once, it does not
/// change when the index does (the tables are shared, the overlay copied). Rows of the base
/// table come first, then those of the delta table (if any), then the overlay's.
pub struct Rows {
    /// The index's tables, base first; no id is in two of them.
    tables: Vec<Arc<Table>>,
    /// The row of each table's first entry.
    firsts: Vec<u64>,
    /// The overlay at the time, sorted by id: the rows after the tables'.
    extra: Vec<IndexEntry>,
}

impl Rows {
    pub(crate) fn new(tables: Vec<Arc<Table>>, mut extra: Vec<IndexEntry>) -> Rows {
        extra.sort_unstable_by_key(|e| e.entry.id);
        let firsts = tables
            .iter()
            .scan(0, |first, t| {
                let at = *first;
                *first += t.len() as u64;
                Some(at)
            })
            .collect();
        Rows {
            tables,
            firsts,
            extra,
        }
    }

    /// A numbering of `entries` alone, in id order (one row per id), for blobs that are not
    /// in a cache table.
    pub fn in_memory(mut entries: Vec<IndexEntry>) -> Rows {
        entries.sort_unstable_by_key(|e| e.entry.id);
        entries.dedup_by_key(|e| e.entry.id);
        Rows::new(Vec::new(), entries)
    }

    fn tables_len(&self) -> u64 {
        self.tables.iter().map(|t| t.len() as u64).sum()
    }

    /// The tables with the row of their first entry, newest (the delta) first: where lookups
    /// look first.
    fn newest_first(&self) -> impl Iterator<Item = (u64, &Table)> + '_ {
        self.firsts
            .iter()
            .copied()
            .zip(self.tables.iter().map(|t| &**t))
            .rev()
    }

    /// Number of rows.
    pub fn len(&self) -> u64 {
        self.tables_len() + self.extra.len() as u64
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The row of a blob, if it is indexed. A blob in both a table and the overlay has the
    /// overlay's row, as lookups find it there first.
    pub fn row(&self, id: &ChunkId) -> Option<u64> {
        if let Ok(i) = self.extra.binary_search_by_key(id, |e| e.entry.id) {
            return Some(self.tables_len() + i as u64);
        }
        self.newest_first()
            .find_map(|(first, t)| t.position(id).map(|i| first + i as u64))
    }

    /// The rows of `items`, which carry an id (`id_of`) and must be sorted by it: `f(i, row)`
    /// for each in turn, reading each table front to back once (see [`Table::cursor`]); far
    /// faster than one [`row`](Self::row) each for a snapshot's worth of ids.
    pub fn rows_sorted_by<'a, T>(
        &self,
        items: &'a [T],
        id_of: impl Fn(&'a T) -> &'a ChunkId,
        mut f: impl FnMut(usize, Option<u64>),
    ) {
        let t = self.tables_len();
        let tables: Vec<(u64, &Table)> = self.newest_first().collect();
        let mut cursors: Vec<_> = tables.iter().map(|(_, table)| table.cursor()).collect();
        for (i, id) in items.iter().map(id_of).enumerate() {
            let row = match self.extra.binary_search_by_key(id, |e| e.entry.id) {
                Ok(x) => Some(t + x as u64),
                Err(_) => tables
                    .iter()
                    .zip(&mut cursors)
                    .find_map(|((first, _), c)| c.seek(id).map(|p| first + p as u64)),
            };
            f(i, row);
        }
    }

    /// The blob of a row (`None` past the end).
    pub fn entry(&self, row: u64) -> Option<IndexEntry> {
        for (first, t) in self.newest_first() {
            if row >= first && row < first + t.len() as u64 {
                return t.entry_at((row - first) as usize);
            }
        }
        let t = self.tables_len();
        self.extra
            .get(usize::try_from(row.checked_sub(t)?).ok()?)
            .copied()
    }
}

/// The 64-bit words of a [`RowBits`] or [`RowCounts`]: on the heap when small, else in a
/// scratch file.
enum Words {
    Heap(Vec<u64>),
    Mapped {
        map: MmapMut,
        /// Kept open for the life of the mapping (the file itself is already unlinked).
        _file: File,
        unflushed: u64,
    },
}

impl Words {
    /// `n` words, all zero: on the heap up to [`HEAP_MAX_BYTES`], else in a scratch file.
    fn new(n: u64, scratch_dir: &Path) -> std::io::Result<Words> {
        if n * 8 <= HEAP_MAX_BYTES {
            let n = usize::try_from(n).map_err(std::io::Error::other)?;
            Ok(Words::Heap(vec![0; n]))
        } else {
            Self::mapped(n, scratch_dir)
        }
    }

    /// `n` words, all zero, in a scratch file whatever the size.
    fn mapped(n: u64, scratch_dir: &Path) -> std::io::Result<Words> {
        // Unlinked at once: nothing is left behind however the process ends. Sparse: pages
        // never written take no disk space and read as zeros.
        let file = tempfile::tempfile_in(scratch_dir)?;
        file.set_len(n.max(1) * 8)?;
        // SAFETY: the file is private to this process (unlinked, never shared), so nobody
        // else can change or truncate it under the mapping.
        #[allow(unsafe_code)]
        let map = unsafe { MmapMut::map_mut(&file) }?;
        Ok(Words::Mapped {
            map,
            _file: file,
            unflushed: 0,
        })
    }

    fn get(&self, i: u64) -> u64 {
        match self {
            Words::Heap(w) => w[i as usize],
            Words::Mapped { map, .. } => {
                let at = (i * 8) as usize;
                u64::from_le_bytes(map[at..at + 8].try_into().expect("eight bytes"))
            }
        }
    }

    fn set(&mut self, i: u64, value: u64) {
        match self {
            Words::Heap(w) => w[i as usize] = value,
            Words::Mapped { map, unflushed, .. } => {
                let at = (i * 8) as usize;
                map[at..at + 8].copy_from_slice(&value.to_le_bytes());
                *unflushed += 1;
                if *unflushed >= FLUSH_EVERY {
                    *unflushed = 0;
                    // Only a hint to write back: a failure leaves the pages dirty, not wrong.
                    let _ = map.flush_async();
                }
            }
        }
    }

    fn is_mapped(&self) -> bool {
        matches!(self, Words::Mapped { .. })
    }
}

/// Panics unless `row < len`: a row past the end is a bug, never a silent fact.
fn check_row(row: u64, len: u64) {
    assert!(row < len, "row {row} past the end of {len} rows");
}

/// One bit per row, all clear at first.
pub struct RowBits {
    words: Words,
    len: u64,
}

impl RowBits {
    /// Bits for `len` rows: on the heap when small, else in a scratch file in `scratch_dir`.
    pub fn new(len: u64, scratch_dir: &Path) -> std::io::Result<RowBits> {
        Ok(RowBits {
            words: Words::new(len.div_ceil(64), scratch_dir)?,
            len,
        })
    }

    /// Bits for `len` rows in a scratch file, whatever the size.
    pub fn mapped(len: u64, scratch_dir: &Path) -> std::io::Result<RowBits> {
        Ok(RowBits {
            words: Words::mapped(len.div_ceil(64), scratch_dir)?,
            len,
        })
    }

    /// Number of rows.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bit of `row`.
    pub fn get(&self, row: u64) -> bool {
        check_row(row, self.len);
        self.words.get(row / 64) & (1 << (row % 64)) != 0
    }

    /// Sets the bit of `row`; returns whether it was set before.
    pub fn set(&mut self, row: u64) -> bool {
        check_row(row, self.len);
        let (i, bit) = (row / 64, 1u64 << (row % 64));
        let old = self.words.get(i);
        if old & bit != 0 {
            return true;
        }
        self.words.set(i, old | bit);
        false
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        (0..self.len.div_ceil(64))
            .map(|i| u64::from(self.words.get(i).count_ones()))
            .sum()
    }

    /// Whether this array lives in a scratch file.
    pub fn is_mapped(&self) -> bool {
        self.words.is_mapped()
    }
}

/// One 64-bit counter per row, all zero at first: a count per pack of the sorted pack list,
/// say. Eight bytes a row, so it goes to a scratch file past 2^19 rows.
pub struct RowCounts {
    words: Words,
    len: u64,
}

impl RowCounts {
    /// Counters for `len` rows: on the heap when small, else in a scratch file in
    /// `scratch_dir`.
    pub fn new(len: u64, scratch_dir: &Path) -> std::io::Result<RowCounts> {
        Ok(RowCounts {
            words: Words::new(len, scratch_dir)?,
            len,
        })
    }

    /// Counters for `len` rows in a scratch file, whatever the size.
    pub fn mapped(len: u64, scratch_dir: &Path) -> std::io::Result<RowCounts> {
        Ok(RowCounts {
            words: Words::mapped(len, scratch_dir)?,
            len,
        })
    }

    /// Number of rows.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The counter of `row`.
    pub fn get(&self, row: u64) -> u64 {
        check_row(row, self.len);
        self.words.get(row)
    }

    /// Adds `n` to the counter of `row` (saturating: a count never wraps to a small one);
    /// returns the new value.
    pub fn add(&mut self, row: u64, n: u64) -> u64 {
        check_row(row, self.len);
        let value = self.words.get(row).saturating_add(n);
        self.words.set(row, value);
        value
    }

    /// Whether this array lives in a scratch file.
    pub fn is_mapped(&self) -> bool {
        self.words.is_mapped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_past_two_to_the_32_in_a_sparse_scratch_file() {
        let dir = tempfile::tempdir().unwrap();
        // 2^33 rows: a 1 GiB sparse file, of which only the touched pages exist.
        let len = (1u64 << 33) + 64;
        let mut bits = RowBits::mapped(len, dir.path()).unwrap();
        assert!(bits.is_mapped());
        let row = (1u64 << 32) + 5;
        assert!(!bits.get(row));
        assert!(!bits.set(row));
        assert!(bits.set(row), "set twice reports the first");
        assert!(bits.get(row));
        // Neighbours, in the same word and across the 2^32 boundary, stay clear.
        for other in [row - 1, row + 1, 5, (1u64 << 32) - 1, len - 1] {
            assert!(!bits.get(other), "row {other}");
        }
        assert!(!bits.set(len - 1));
        assert!(bits.get(len - 1));
    }

    #[test]
    fn a_counter_past_two_to_the_32_in_a_sparse_scratch_file() {
        let dir = tempfile::tempdir().unwrap();
        // 2^32 + 64 counters of 8 bytes: a 32 GiB sparse file, of which one page exists.
        let len = (1u64 << 32) + 64;
        let mut counts = RowCounts::mapped(len, dir.path()).unwrap();
        assert!(counts.is_mapped());
        let row = (1u64 << 32) + 5;
        assert_eq!(counts.get(row), 0);
        assert_eq!(counts.add(row, 3), 3);
        assert_eq!(counts.add(row, 1 << 40), (1 << 40) + 3, "64-bit counts");
        assert_eq!(counts.get(row), (1 << 40) + 3);
        // Row 5, where a 32-bit row number would wrap to, and the neighbours stay zero.
        for other in [row - 1, row + 1, 5, len - 1] {
            assert_eq!(counts.get(other), 0, "row {other}");
        }
        assert_eq!(counts.add(row, u64::MAX), u64::MAX, "saturates");
    }

    #[test]
    fn heap_and_mapped_counts_agree() {
        let dir = tempfile::tempdir().unwrap();
        let len = 1000;
        let mut heap = RowCounts::new(len, dir.path()).unwrap();
        let mut mapped = RowCounts::mapped(len, dir.path()).unwrap();
        assert!(!heap.is_mapped());
        for row in (0..len).flat_map(|r| std::iter::repeat_n(r, (r % 5) as usize)) {
            assert_eq!(heap.add(row, row), mapped.add(row, row));
        }
        for row in 0..len {
            assert_eq!(heap.get(row), mapped.get(row), "row {row}");
            assert_eq!(heap.get(row), row * (row % 5));
        }
        // Past the heap limit they go to a scratch file by themselves.
        let big = RowCounts::new(HEAP_MAX_BYTES / 8 + 1, dir.path()).unwrap();
        assert!(big.is_mapped());
    }

    #[test]
    fn heap_and_mapped_bits_agree() {
        let dir = tempfile::tempdir().unwrap();
        let len = 10_000;
        let mut heap = RowBits::new(len, dir.path()).unwrap();
        let mut mapped = RowBits::mapped(len, dir.path()).unwrap();
        assert!(!heap.is_mapped());
        for row in (0..len).filter(|r| r % 7 == 3 || r % 64 == 63) {
            assert_eq!(heap.set(row), mapped.set(row));
        }
        for row in 0..len {
            assert_eq!(heap.get(row), mapped.get(row), "row {row}");
            assert_eq!(heap.get(row), row % 7 == 3 || row % 64 == 63);
        }
        assert_eq!(heap.count(), mapped.count());
        assert_eq!(
            heap.count(),
            (0..len).filter(|r| r % 7 == 3 || r % 64 == 63).count() as u64
        );
    }

    #[test]
    #[should_panic(expected = "past the end")]
    fn a_row_past_the_end_is_a_bug_not_a_silent_bit() {
        let dir = tempfile::tempdir().unwrap();
        let mut bits = RowBits::new(10, dir.path()).unwrap();
        bits.set(10);
    }
}
