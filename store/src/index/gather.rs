//! What a refresh reads from the repository's index files before it folds them into a table:
//! their entries in memory while they fit a run, else spilled to scratch files by id prefix
//! ([`spill`](super::spill)). A rebuild of 10^8 entries under a tight memory limit so writes
//! each entry once and reads it once, and sorts one partition of a few hundred thousand
//! entries at a time in memory (by 8-byte keys: the ids are keyed hashes, spread evenly, so 40
//! more bits of them nearly always decide), on a thread of its own, a partition ahead of the
//! table's writer. Before, it wrote sorted runs of 2^19 entries as temporary tables (filter and
//! block hashes included) and merged all 190 of them through a heap: every entry hashed twice
//! more, and 190 files read side by side (113 s at 10^8 under 256 MiB, now about 30 s: see
//! docs/benchmarks.md).

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::file::IndexFile;
use super::spill::{partition, read_records, read_records_into, write_partitioned, Record, Spill};
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
/// Bytes of a partition's entries written at once (about 64 KiB; 16 MiB for all 2^8).
const PENDING_BYTES: usize = 1170 * super::table::TABLE_ENTRY_LEN;

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
    /// Per partition, the bytes of its entries not written yet: each entry is encoded straight
    /// into its partition's buffer (grouping a buffer of all partitions' entries before writing
    /// it was another pass over every entry's bytes, and memory bandwidth is what a rebuild is
    /// short of).
    pending: Vec<Vec<u8>>,
    /// Why writing a buffer failed, for [`Gathered::add`] to report.
    write_error: Option<std::io::Error>,
    /// Entries spilled or pending (an id stored twice counts twice).
    len: u64,
    /// The partitions were taken by [`Spilled::sorted`]: the entries are no longer here.
    taken: bool,
    /// Why [`Spilled::sorted`] ended its entries early (a scratch file that could not be
    /// written or read, a sorting thread that could not start or stopped): some are lost.
    /// Shared with the fold, which checks it before the table it wrote is renamed into place.
    failed: Failure,
}

/// Where [`Spilled::sorted`] leaves its error, if it fails.
pub(super) type Failure = Rc<RefCell<Option<std::io::Error>>>;

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
                entries.iter().for_each(|e| s.push(encode_entry(n, e)));
            }
            return s.write_error.take().map_or(Ok(()), Err);
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
            pending: vec![Vec::new(); 1 << bits_for(total)],
            write_error: None,
            len: 0,
            taken: false,
            failed: Failure::default(),
        };
        for e in std::mem::take(&mut self.entries) {
            let n = s.pack_number(&e.pack);
            s.push(encode_entry(n, &e.entry));
        }
        let result = s.write_error.take().map_or(Ok(()), Err);
        self.spilled = Some(s);
        result
    }

    /// True when the entries were spilled (many of them: a table is due).
    pub(super) fn is_spilled(&self) -> bool {
        self.spilled.is_some()
    }

    /// The spilled entries, gathered in full, for [`Index::fold`]. The map that numbered
    /// their packs as they came is let go first: the fold numbers them its own way, and two
    /// maps of 390,000 packs at 10^8 entries are 30 MB.
    pub(super) fn spilled(&mut self) -> Option<&mut Spilled> {
        let s = self.spilled.as_mut()?;
        s.number = HashMap::new();
        Some(s)
    }

    /// Puts what was gathered into the overlay instead (a small refresh, or a cache folder that
    /// cannot be written), a partition at a time, the entries written out before those still
    /// pending (so that of an id gathered twice the first is kept). False when spilled entries
    /// could not be read back, or a failed fold took them: the index files are then not
    /// claimed, and the caller must read them again (the overlay never claims a file whose
    /// entries it lacks).
    #[must_use]
    pub(super) fn into_overlay(self, st: &mut State) -> bool {
        if let Some(mut s) = self.spilled {
            if s.taken {
                return false;
            }
            let packs = &s.packs;
            let decoded = |e: &EntryBytes| decode_entry(e, packs).ok();
            for part in &mut s.parts {
                let records = part.records;
                match part
                    .reader()
                    .and_then(|mut r| read_records::<EntryBytes>(&mut r, records))
                {
                    Ok(read) => Index::add_entries_only(st, read.iter().filter_map(decoded)),
                    Err(_) => return false,
                }
            }
            for p in &s.pending {
                let entries = p.chunks_exact(EntryBytes::LEN).map(EntryBytes::get);
                Index::add_entries_only(st, entries.filter_map(|e| decoded(&e)));
            }
        }
        Index::add_entries_only(st, self.entries);
        st.overlay_files.extend(self.files);
        true
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

    /// Adds an entry, written out with its partition's buffer once that is full. After a
    /// failed write ([`Spilled::write_error`]) the entries stay in their buffers, for
    /// [`Gathered::into_overlay`].
    fn push(&mut self, e: EntryBytes) {
        let p = partition(e.id(), 0, self.bits);
        self.len += 1;
        self.pending[p].extend_from_slice(&e);
        if self.pending[p].len() >= PENDING_BYTES && self.write_error.is_none() {
            if let Err(e) = self.write_out(p) {
                self.write_error = Some(e);
            }
        }
    }

    /// Writes partition `p`'s buffer out.
    fn write_out(&mut self, p: usize) -> std::io::Result<()> {
        let bytes = &mut self.pending[p];
        self.parts[p].append(bytes, (bytes.len() / EntryBytes::LEN) as u64)?;
        bytes.clear();
        Ok(())
    }

    /// Writes every buffer out.
    fn spill(&mut self) -> std::io::Result<()> {
        (0..self.pending.len()).try_for_each(|p| self.write_out(p))
    }

    /// Entries gathered (an id stored twice counts twice).
    pub(super) fn len(&self) -> u64 {
        self.len
    }

    /// The packs the entries name.
    pub(super) fn packs(&self) -> &[PackId] {
        &self.packs
    }

    /// Where [`Spilled::sorted`] leaves its error if it ends early: a table written from its
    /// entries would lack some.
    pub(super) fn failure(&self) -> Failure {
        Rc::clone(&self.failed)
    }

    /// Every entry in id order, one per id (of an id stored twice, the first gathered), its
    /// pack numbered by `number` (the new table's numbers). A partition larger than two runs
    /// (past about 2.7 x 10^8 entries in all) is split again by the next prefix bits first. A
    /// scratch file that cannot be written or read ends the entries early
    /// ([`Spilled::failure`]).
    pub(super) fn sorted<'a>(
        &'a mut self,
        number: &HashMap<PackId, u32>,
    ) -> impl Iterator<Item = EntryBytes> + 'a {
        let numbers: Vec<u32> = self.packs.iter().map(|p| number[p]).collect();
        self.taken = true;
        let spilled = self.spill();
        // What gathering needed goes (16 MiB of buffers at 10^8 entries): the page cache has
        // better use for the memory from here on.
        self.pending = Vec::new();
        // Partitions still to sort, the next last, with the prefix bits they share.
        let mut todo: Vec<(Spill, u32)> = std::mem::take(&mut self.parts)
            .into_iter()
            .rev()
            .map(|p| (p, self.bits))
            .collect();
        let scratch = self.scratch.clone();
        // The partitions are read and sorted on a thread of their own, a batch ahead of the
        // fold that hashes and writes every entry into the table: on two cores the halves of
        // a rebuild's second pass overlap. Batches go back to it to be filled again (a fresh
        // buffer of tens of MiB is a page fault per 4 KiB).
        let (tx, rx) = std::sync::mpsc::sync_channel::<Sorted>(0);
        let (give_back, given_back) = std::sync::mpsc::channel::<Vec<EntryBytes>>();
        let sorter = move || {
            if let Err(e) = spilled {
                let _ = tx.send(Sorted::Failed(e));
                return;
            }
            let (mut read, mut keys) = (Vec::new(), Vec::new());
            while let Some((mut part, from)) = todo.pop() {
                if let Some((next, _)) = todo.last() {
                    next.will_need();
                }
                let mut batch = given_back.try_recv().unwrap_or_default();
                batch.clear();
                let buffers = (&mut read, &mut keys, &mut batch);
                if let Err(e) = next_batch(&scratch, &mut part, from, &mut todo, &numbers, buffers)
                {
                    let _ = tx.send(Sorted::Failed(e));
                    return;
                }
                if !batch.is_empty() && tx.send(Sorted::Batch(batch)).is_err() {
                    return;
                }
            }
            let _ = tx.send(Sorted::Done);
        };
        if let Err(e) = std::thread::Builder::new()
            .name("sbk-index-sort".into())
            .spawn(sorter)
        {
            *self.failed.borrow_mut() = Some(e);
        }
        let failed = Rc::clone(&self.failed);
        let (mut batch, mut at, mut done) = (Vec::new(), 0, false);
        std::iter::from_fn(move || loop {
            if let Some(e) = batch.get(at) {
                at += 1;
                return Some(*e);
            }
            if done || failed.borrow().is_some() {
                return None;
            }
            let _ = give_back.send(std::mem::take(&mut batch));
            at = 0;
            match rx.recv() {
                Ok(Sorted::Batch(b)) => batch = b,
                Ok(Sorted::Done) => done = true,
                Ok(Sorted::Failed(e)) => *failed.borrow_mut() = Some(e),
                // Not a normal end: the entries after it would be missing from the table.
                Err(_) => {
                    *failed.borrow_mut() = Some(std::io::Error::other(
                        "the thread sorting the index rebuild stopped",
                    ))
                }
            }
        })
    }
}

/// What the thread sorting a spill's partitions sends.
enum Sorted {
    /// The next entries, in id order.
    Batch(Vec<EntryBytes>),
    /// A scratch file could not be written or read: the entries end here.
    Failed(std::io::Error),
    /// Every entry was sent.
    Done,
}

/// Reads a partition sharing `from` prefix bits into `batch`, sorted, without repeated ids
/// and numbered by `numbers` (`read` and `keys` are scratch space); or, when it holds more
/// than two runs, splits it by the next prefix bits into partitions pushed on `todo` (to be
/// taken next, in order).
fn next_batch(
    scratch: &Path,
    part: &mut Spill,
    from: u32,
    todo: &mut Vec<(Spill, u32)>,
    numbers: &[u32],
    (read, keys, batch): (&mut Vec<u8>, &mut Vec<u64>, &mut Vec<EntryBytes>),
) -> std::io::Result<()> {
    let records = part.records;
    if records > 2 * RUN_ENTRIES as u64 && from < 64 {
        let bits = bits_for(records).min(64 - from);
        let mut subs = Spill::many(scratch, 1 << bits)?;
        let mut reader = part.reader()?;
        let mut left = records;
        let mut spare = Vec::new();
        while left > 0 {
            read_records_into(&mut reader, left.min(RUN_ENTRIES as u64), batch)?;
            left -= batch.len() as u64;
            group_by_bits(batch, &mut spare, from, bits);
            write_partitioned(batch, from, bits, &mut subs)?;
        }
        batch.clear();
        todo.extend(subs.into_iter().rev().map(|s| (s, from + bits)));
        return Ok(());
    }
    part.read_all::<EntryBytes>(read)?;
    sort_partition(read, from, numbers, keys, batch);
    Ok(())
}

/// Sorts a partition's entries (`bytes`), which share their first `from` id bits, into `out`
/// by id, one per id (of an id gathered twice, the first), their packs numbered by `numbers`.
/// What is sorted is a key per entry, not the 56-byte entries: the next 40 bits of the id
/// and the entry's place (so that equal ids keep their order), 8 bytes in all. The entries
/// are then copied out once, in that order; only when two keys share those 40 bits (rarely,
/// with evenly spread ids) does an insertion pass put them in order by whole id and drop
/// repeats. Moving the entries themselves through a radix sort was most of a rebuild's memory
/// traffic.
fn sort_partition(
    bytes: &[u8],
    from: u32,
    numbers: &[u32],
    keys: &mut Vec<u64>,
    out: &mut Vec<EntryBytes>,
) {
    let entry = |i: usize| {
        let mut e = EntryBytes::get(&bytes[i * EntryBytes::LEN..(i + 1) * EntryBytes::LEN]);
        let pack = numbers[pack_number(&e) as usize];
        renumber(&mut e, pack);
        e
    };
    let n = bytes.len() / EntryBytes::LEN;
    out.clear();
    if n >= 1 << 24 {
        // Only ids alike in their first 64 bits, never split, come here.
        out.extend((0..n).map(entry));
        out.sort_by(|a, b| a[..32].cmp(&b[..32]));
        out.dedup_by(|later, first| later[..32] == first[..32]);
        return;
    }
    let from = from.min(88);
    keys.clear();
    keys.extend((0..n).map(|i| {
        let at = i * EntryBytes::LEN;
        let top = u128::from_be_bytes(bytes[at..at + 16].try_into().expect("16 bytes"));
        ((top << from >> 88) as u64) << 24 | i as u64
    }));
    keys.sort_unstable();
    let mut tied = false;
    out.extend(keys.iter().enumerate().map(|(k, key)| {
        tied |= k > 0 && keys[k - 1] >> 24 == key >> 24;
        entry((key & 0xff_ffff) as usize)
    }));
    if tied {
        sort_nearly_sorted(out);
        out.dedup_by(|later, first| later[..32] == first[..32]);
    }
}

/// Sorts entries by id, stably (of an id gathered twice, the first stays first), where they
/// are in order of their ids' first bits already and few share those (evenly spread ids): an
/// insertion sort, a step or two per entry. Should the ids be bunched after all, it gives up
/// and sorts them whole.
fn sort_nearly_sorted(entries: &mut [EntryBytes]) {
    // The first 8 bytes settle nearly every comparison.
    let before = |a: &EntryBytes, b: &EntryBytes| {
        let (x, y) = (
            u64::from_be_bytes(a[..8].try_into().expect("8 bytes")),
            u64::from_be_bytes(b[..8].try_into().expect("8 bytes")),
        );
        x < y || (x == y && a[8..32] < b[8..32])
    };
    let mut moves = 0;
    for i in 1..entries.len() {
        let mut j = i;
        while j > 0 && before(&entries[j], &entries[j - 1]) {
            entries.swap(j, j - 1);
            j -= 1;
        }
        moves += i - j;
        if moves > 4 * entries.len() {
            entries.sort_by(|a, b| a[..32].cmp(&b[..32]));
            return;
        }
    }
}

/// Puts `entries` in the order of their `bits` (at most 8) prefix bits after the first
/// `from`, stably (entries of the same prefix keep their order): a counting sort. `spare` is
/// scratch space.
fn group_by_bits(entries: &mut Vec<EntryBytes>, spare: &mut Vec<EntryBytes>, from: u32, bits: u32) {
    assert!(bits <= MAX_BITS, "a pass streams to at most 256 places");
    let mut starts = [0usize; (1 << MAX_BITS) + 1];
    for e in entries.iter() {
        starts[partition(e.id(), from, bits) + 1] += 1;
    }
    for i in 1..starts.len() {
        starts[i] += starts[i - 1];
    }
    // Every place is written below: what `spare` held is kept, and only growth is filled
    // first.
    spare.resize(entries.len(), [0u8; super::table::TABLE_ENTRY_LEN]);
    for e in entries.iter() {
        let p = partition(e.id(), from, bits);
        spare[starts[p]] = *e;
        starts[p] += 1;
    }
    std::mem::swap(entries, spare);
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
        assert!(s.failure().borrow().is_none());
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

    /// A partition's sort gives what a stable sort by id gives, one per id, with evenly spread
    /// ids and with ids bunched under one prefix (alike in all 40 bits of their keys: the
    /// insertion pass gives up and sorts them whole), repeated ids included.
    #[test]
    fn a_partition_sorts_stably_however_its_ids_are_spread() {
        let even = |i: u32| *blake3::hash(&(i % 5000).to_le_bytes()).as_bytes();
        let bunched = |i: u32| {
            let mut id = even(i);
            id[..12].fill(7);
            id
        };
        for make in [&even as &dyn Fn(u32) -> [u8; 32], &bunched] {
            let entries: Vec<EntryBytes> = (0..6000u32)
                .map(|i| {
                    let mut e = encode_entry(i, &entry(i));
                    e[..32].copy_from_slice(&make(i));
                    e
                })
                .collect();
            let mut want = entries.clone();
            want.sort_by(|a, b| a[..32].cmp(&b[..32]));
            let mut got = Vec::new();
            let bytes: Vec<u8> = entries.iter().flatten().copied().collect();
            let numbers: Vec<u32> = (0..6000).collect();
            sort_partition(&bytes, 0, &numbers, &mut Vec::new(), &mut got);
            want.dedup_by(|later, first| later[..32] == first[..32]);
            assert!(got == want);
        }
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
        assert!(gather().into_overlay(&mut st));
        assert_eq!(st.overlay.len(), 9000);
        assert_eq!(st.overlay_files.len(), 3);
        assert_eq!(st.overlay[&entry(4321).id].pack, PackId([1; 16]));

        let mut st = state();
        let mut g = gather();
        let number: HashMap<PackId, u32> =
            (0..3).map(|k| (PackId([k; 16]), u32::from(k))).collect();
        assert_eq!(g.spilled().unwrap().sorted(&number).take(10).count(), 10);
        assert!(
            !g.into_overlay(&mut st),
            "the caller must read the files again"
        );
        assert!(st.overlay_files.is_empty());
    }
}
