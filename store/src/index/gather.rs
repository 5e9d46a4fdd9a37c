//! What a refresh reads from the repository's index files before it folds them into a table:
//! their entries in memory while they fit a run, else spilled to scratch files by id prefix
//! ([`spill`](super::spill)). A rebuild of 10^8 entries under a tight memory limit so writes
//! each entry once and reads it once, and sorts one partition of a few hundred thousand
//! entries at a time, in memory, by their ids' next bits (the ids are keyed hashes, spread
//! evenly). Before, it wrote sorted runs of 2^19 entries as temporary tables (filter and block
//! hashes included) and merged all 190 of them through a heap: every entry hashed twice more,
//! and 190 files read side by side.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::file::IndexFile;
use super::spill::{partition, read_records, write_partitioned, Record, Spill};
use super::table::{decode_entry, encode_entry, pack_number, renumber, EntryBytes};
use super::{Index, IndexEntry, State, RUN_ENTRIES};
use crate::id::{IndexId, PackId};

/// A spill's entries are table entries, numbered into the spill's own list of packs.
impl Record for EntryBytes {
    const LEN: usize = super::table::TABLE_ENTRY_LEN;

    fn id(&self) -> &[u8; 32] {
        self[..32].try_into().expect("an entry starts with its id")
    }

    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self);
    }

    fn get(raw: &[u8]) -> Self {
        raw.try_into().expect("a whole entry")
    }
}

/// At most this many prefix bits choose a partition (one scratch file each, open at once).
const MAX_BITS: u32 = 8;

/// Index files read by a refresh, not in a table yet.
#[derive(Default)]
pub(super) struct Gathered {
    /// The index files read.
    pub(super) files: Vec<IndexId>,
    /// Their entries, while they fit a run.
    pub(super) entries: Vec<IndexEntry>,
    /// All their entries, once they did not.
    spilled: Option<Spilled>,
}

/// Entries spilled by id prefix.
pub(super) struct Spilled {
    /// Where the scratch files are.
    scratch: PathBuf,
    /// Prefix bits that choose a partition.
    bits: u32,
    parts: Vec<Spill>,
    /// The packs the entries name, by their number in the spill.
    packs: Vec<PackId>,
    number: HashMap<PackId, u32>,
    /// Entries not written yet.
    buf: Vec<EntryBytes>,
    /// Entries spilled or in `buf` (an id stored twice counts twice).
    len: u64,
    /// The partitions were taken by [`Spilled::sorted`]: the entries are no longer here.
    taken: bool,
    /// Writing or reading a scratch file failed while the entries were sorted: some are lost.
    failed: Option<std::io::Error>,
}

impl Gathered {
    /// Adds an index file read, one of `expected` this refresh reads: spilled to scratch
    /// files in `scratch` once the entries outgrow a run. On an error (a full cache disk) the
    /// file is gathered all the same; [`Gathered::into_overlay`] still has every entry.
    pub(super) fn add(
        &mut self,
        scratch: &Path,
        id: IndexId,
        file: IndexFile,
        expected: usize,
    ) -> std::io::Result<()> {
        self.files.push(id);
        if let Some(s) = &mut self.spilled {
            for (pack, entries) in &file.packs {
                let n = s.pack_number(pack);
                s.buf.extend(entries.iter().map(|e| encode_entry(n, e)));
            }
            s.len += file.packs.iter().map(|(_, e)| e.len() as u64).sum::<u64>();
            return if s.buf.len() >= RUN_ENTRIES {
                s.spill()
            } else {
                Ok(())
            };
        }
        self.entries.extend(IndexEntry::of_file(file));
        if self.entries.len() < RUN_ENTRIES {
            return Ok(());
        }
        // Partitions of about a run each, from the entries per file so far.
        let total = self.entries.len() as u64 * expected.max(self.files.len()) as u64
            / self.files.len() as u64;
        let mut s = Spilled {
            scratch: scratch.to_owned(),
            bits: bits_for(total),
            parts: Spill::many(scratch, 1 << bits_for(total))?,
            packs: Vec::new(),
            number: HashMap::new(),
            buf: Vec::with_capacity(RUN_ENTRIES),
            len: self.entries.len() as u64,
            taken: false,
            failed: None,
        };
        for e in &self.entries {
            let n = s.pack_number(&e.pack);
            s.buf.push(encode_entry(n, &e.entry));
        }
        self.spilled = Some(s);
        self.entries = Vec::new();
        self.spilled.as_mut().expect("just set").spill()
    }

    /// True when the entries were spilled (many of them: a table is due).
    pub(super) fn is_spilled(&self) -> bool {
        self.spilled.is_some()
    }

    /// The spilled entries, for [`Index::fold`].
    pub(super) fn spilled(&mut self) -> Option<&mut Spilled> {
        self.spilled.as_mut()
    }

    /// Puts what was gathered into the overlay instead (a small refresh, or a cache folder that
    /// cannot be written). When spilled entries cannot be read back (or a failed fold took
    /// them), the index files are left out, and the next refresh reads them again: the overlay
    /// never claims a file whose entries it lacks.
    pub(super) fn into_overlay(self, st: &mut State) {
        if let Some(mut s) = self.spilled {
            if s.taken {
                return;
            }
            let mut entries = std::mem::take(&mut s.buf);
            let mut whole = true;
            for part in &mut s.parts {
                let records = part.records;
                match part
                    .reader()
                    .and_then(|mut r| read_records::<EntryBytes>(&mut r, records))
                {
                    Ok(mut read) => entries.append(&mut read),
                    Err(_) => whole = false,
                }
            }
            let packs = &s.packs;
            Index::add_entries_only(
                st,
                entries.iter().filter_map(|e| decode_entry(e, packs).ok()),
            );
            if !whole {
                return;
            }
        }
        Index::add_entries_only(st, self.entries);
        st.overlay_files.extend(self.files);
    }
}

/// Prefix bits for partitions of about a run each, of `total` entries.
fn bits_for(total: u64) -> u32 {
    let parts = total.div_ceil(RUN_ENTRIES as u64).max(2);
    parts.next_power_of_two().trailing_zeros().min(MAX_BITS)
}

impl Spilled {
    fn pack_number(&mut self, pack: &PackId) -> u32 {
        *self.number.entry(*pack).or_insert_with(|| {
            self.packs.push(*pack);
            (self.packs.len() - 1) as u32
        })
    }

    /// Writes the buffer out to the partitions.
    fn spill(&mut self) -> std::io::Result<()> {
        let buf = std::mem::take(&mut self.buf);
        let grouped = group_by_bits(buf, 0, self.bits);
        write_partitioned(&grouped, 0, self.bits, &mut self.parts)?;
        self.buf = grouped;
        self.buf.clear();
        Ok(())
    }

    /// Entries gathered (an id stored twice counts twice).
    pub(super) fn len(&self) -> u64 {
        self.len
    }

    /// The packs the entries name.
    pub(super) fn packs(&self) -> &[PackId] {
        &self.packs
    }

    /// Why [`Spilled::sorted`] ended early, if it did: a table written from its entries would
    /// lack some.
    pub(super) fn failed(&mut self) -> Option<std::io::Error> {
        self.failed.take()
    }

    /// Every entry in id order, one per id (of an id stored twice, the first gathered), its
    /// pack numbered by `number` (the new table's numbers). A partition larger than two runs
    /// (past about 10^9 entries) is split again by the next prefix bits first. A scratch file
    /// that cannot be written or read ends the entries early ([`Spilled::failed`]).
    pub(super) fn sorted<'a>(
        &'a mut self,
        number: &'a HashMap<PackId, u32>,
    ) -> impl Iterator<Item = EntryBytes> + 'a {
        let numbers: Vec<u32> = self.packs.iter().map(|p| number[p]).collect();
        self.taken = true;
        if let Err(e) = self.spill() {
            self.failed = Some(e);
        }
        // Partitions still to sort, the next last, with the prefix bits they share.
        let mut todo: Vec<(Spill, u32)> = std::mem::take(&mut self.parts)
            .into_iter()
            .rev()
            .map(|p| (p, self.bits))
            .collect();
        let failed = &mut self.failed;
        let scratch = &self.scratch;
        let mut batch = Vec::<EntryBytes>::new().into_iter();
        std::iter::from_fn(move || loop {
            if let Some(mut e) = batch.next() {
                let pack = numbers[pack_number(&e) as usize];
                renumber(&mut e, pack);
                return Some(e);
            }
            if failed.is_some() {
                return None;
            }
            let (mut part, from) = todo.pop()?;
            match next_batch(scratch, &mut part, from, &mut todo) {
                Ok(b) => batch = b.into_iter(),
                Err(e) => *failed = Some(e),
            }
        })
    }
}

/// Reads a partition sharing `from` prefix bits: sorted and without repeated ids, or, when it
/// holds more than two runs, split by the next prefix bits into partitions pushed on `todo`
/// (to be taken next, in order) and nothing returned.
fn next_batch(
    scratch: &Path,
    part: &mut Spill,
    from: u32,
    todo: &mut Vec<(Spill, u32)>,
) -> std::io::Result<Vec<EntryBytes>> {
    let records = part.records;
    let mut reader = part.reader()?;
    if records > 2 * RUN_ENTRIES as u64 && from < 64 {
        let bits = bits_for(records).min(64 - from);
        let mut subs = Spill::many(scratch, 1 << bits)?;
        let mut left = records;
        while left > 0 {
            let run: Vec<EntryBytes> = read_records(&mut reader, left.min(RUN_ENTRIES as u64))?;
            left -= run.len() as u64;
            let run = group_by_bits(run, from, bits);
            write_partitioned(&run, from, bits, &mut subs)?;
        }
        todo.extend(subs.into_iter().rev().map(|s| (s, from + bits)));
        return Ok(Vec::new());
    }
    let read: Vec<EntryBytes> = read_records(&mut reader, records)?;
    let mut sorted = group_by_bits(read, from, 16.min(64 - from));
    // Stable: of entries with the same next 16 bits, the first gathered stays first. With
    // evenly spread ids a few entries share them, and the sort of each stretch is short.
    let key = |e: &EntryBytes| partition(e.id(), from, 16.min(64 - from));
    let mut rest = &mut sorted[..];
    while let Some(first) = rest.first() {
        let k = key(first);
        let len = rest.partition_point(|e| key(e) == k);
        let (stretch, after) = rest.split_at_mut(len);
        if stretch.len() > 1 {
            stretch.sort_by(|a, b| a[..32].cmp(&b[..32]));
        }
        rest = after;
    }
    sorted.dedup_by(|later, first| later[..32] == first[..32]);
    Ok(sorted)
}

/// `entries` in the order of their `bits` prefix bits after the first `from` (a counting sort:
/// stable, so entries of the same prefix keep their order).
fn group_by_bits(entries: Vec<EntryBytes>, from: u32, bits: u32) -> Vec<EntryBytes> {
    if bits == 0 {
        return entries;
    }
    let mut starts = vec![0usize; (1 << bits) + 1];
    for e in &entries {
        starts[partition(e.id(), from, bits) + 1] += 1;
    }
    for i in 1..starts.len() {
        starts[i] += starts[i - 1];
    }
    let mut out = vec![[0u8; super::table::TABLE_ENTRY_LEN]; entries.len()];
    for e in &entries {
        let p = partition(e.id(), from, bits);
        out[starts[p]] = *e;
        starts[p] += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BlobKind, ChunkId, Compression, PackEntry};

    fn entry(i: u32) -> PackEntry {
        PackEntry {
            id: ChunkId(*blake3::hash(&i.to_le_bytes()).as_bytes()),
            kind: BlobKind::Data,
            compression: Compression::Zstd,
            offset: u64::from(i) * 7,
            stored_len: i,
            raw_len: i + 1,
        }
    }

    fn file(pack: u8, ids: impl Iterator<Item = u32>) -> IndexFile {
        IndexFile {
            packs: vec![(PackId([pack; 16]), ids.map(entry).collect())],
            extensions: Vec::new(),
        }
    }

    /// Spilled entries come back in id order, one per id, the first gathered of an id stored
    /// twice, however the partitions were sized: here the first file suggests one file in all,
    /// so two partitions are made, and each outgrows two runs and is split again.
    #[test]
    fn spilled_entries_come_back_sorted_once_each_the_first_copy_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = Gathered::default();
        let n = 12 * RUN_ENTRIES as u32;
        g.add(
            dir.path(),
            IndexId([1; 32]),
            file(1, 0..RUN_ENTRIES as u32),
            1,
        )
        .unwrap();
        assert!(g.is_spilled());
        g.add(
            dir.path(),
            IndexId([2; 32]),
            file(2, RUN_ENTRIES as u32..n),
            1,
        )
        .unwrap();
        // Ids 0..100 again, in another pack, gathered later: the first copies stay.
        g.add(dir.path(), IndexId([3; 32]), file(3, 0..100), 1)
            .unwrap();
        let s = g.spilled().unwrap();
        assert_eq!(s.len(), u64::from(n) + 100);
        assert_eq!(s.bits, 1);
        // The new table numbers the packs its own way.
        let packs = s.packs().to_vec();
        let number: HashMap<PackId, u32> =
            packs.iter().rev().zip(10..).map(|(p, n)| (*p, n)).collect();
        let table_packs: Vec<PackId> = {
            let mut v = vec![PackId([0; 16]); 13];
            number.iter().for_each(|(p, n)| v[*n as usize] = *p);
            v
        };
        let got: Vec<IndexEntry> = s
            .sorted(&number)
            .map(|e| decode_entry(&e, &table_packs).unwrap())
            .collect();
        assert!(s.failed().is_none());
        assert_eq!(got.len(), n as usize);
        assert!(got.windows(2).all(|w| w[0].entry.id < w[1].entry.id));
        let mut want: Vec<IndexEntry> = (0..n)
            .map(|i| IndexEntry {
                pack: PackId([if i < RUN_ENTRIES as u32 { 1 } else { 2 }; 16]),
                entry: entry(i),
            })
            .collect();
        want.sort_by_key(|e| e.entry.id);
        assert_eq!(got, want);
    }

    /// When no table can be written, what was spilled goes to the overlay whole, and the
    /// overlay claims the index files; a spill already taken by a failed fold claims none.
    #[test]
    fn spilled_entries_reach_the_overlay_or_their_files_are_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let gather = || {
            let mut g = Gathered::default();
            for k in 0..3u32 {
                let ids = k * 3000..(k + 1) * 3000;
                g.add(dir.path(), IndexId([k as u8; 32]), file(k as u8, ids), 3)
                    .unwrap();
            }
            assert!(g.is_spilled());
            g
        };
        let state = || State {
            tables: Vec::new(),
            table_files: Default::default(),
            overlay: Default::default(),
            overlay_files: Default::default(),
            fold_failed: true,
        };
        let mut st = state();
        gather().into_overlay(&mut st);
        assert_eq!(st.overlay.len(), 9000);
        assert_eq!(st.overlay_files.len(), 3);
        assert_eq!(st.overlay[&entry(4321).id].pack, PackId([1; 16]));

        let mut st = state();
        let mut g = gather();
        let number: HashMap<PackId, u32> =
            (0..3).map(|k| (PackId([k; 16]), u32::from(k))).collect();
        assert_eq!(g.spilled().unwrap().sorted(&number).take(10).count(), 10);
        g.into_overlay(&mut st);
        assert!(st.overlay_files.is_empty());
    }
}
