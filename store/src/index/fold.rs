//! Folding into tables: the overlay, an index file due for it, or the index files a refresh
//! gathered (in memory, or spilled by id prefix: [`gather`](super::gather)) are merged with the
//! current tables (or the delta table alone) into a new one (a k-way merge over a heap), which
//! the index uses from then on. (An input alone goes through without the heap.)

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use super::gather::{Gathered, Spilled};
use super::table::{encode_entry, pack_number, renumber, write_table, EntryBytes, Table};
use super::{table_name, Index, IndexEntry, State, DELTA_RATIO};
use crate::error::{Result, StoreError};
use crate::id::{ChunkId, IndexId, PackId};

impl Index {
    /// Folds the overlay and the index files gathered into a new table.
    pub(super) fn fold_gathered(&self, st: &mut State, gathered: &mut Gathered) -> Result<()> {
        gathered.entries.sort_by_key(|e| e.entry.id);
        let files = std::mem::take(&mut gathered.files);
        let entries = std::mem::take(&mut gathered.entries);
        let result = self.fold(st, &files, &entries, gathered.spilled());
        // Given back, for Gathered::into_overlay after a failure.
        gathered.files = files;
        gathered.entries = entries;
        result
    }

    /// Merges the overlay, the `incoming` entries (sorted by id) and the `spilled` ones, which
    /// together hold index files `incoming_files`, with the tables into a new table, and uses
    /// it from now on. While that is small next to the base table, only the delta table is
    /// merged: the new table is the new delta, without the ids the base holds, and the base
    /// stays as it is (at 10^8 entries a base is 5.7 GB to rewrite, for a fold of 2^17).
    pub(super) fn fold(
        &self,
        st: &mut State,
        incoming_files: &[IndexId],
        incoming: &[IndexEntry],
        spilled: Option<&mut Spilled>,
    ) -> Result<()> {
        let all: BTreeSet<IndexId> = st
            .table_files
            .iter()
            .chain(&st.overlay_files)
            .chain(incoming_files)
            .copied()
            .collect();
        let delta_len = st.tables.get(1).map_or(0, |t| t.len());
        let spilled_len = spilled.as_ref().map_or(0, |s| s.len() as usize);
        let new = st.overlay.len() + incoming.len() + spilled_len;
        let base = st
            .tables
            .first()
            .filter(|b| (delta_len + new) * DELTA_RATIO <= b.len())
            .cloned();
        // The tables merged into the new one (the delta alone, or all of them), and the index
        // files the new one holds.
        let (olds, files): (Vec<Arc<Table>>, BTreeSet<IndexId>) = match &base {
            Some(b) => {
                let in_base: HashSet<IndexId> = b.files().collect();
                let own = all.iter().filter(|f| !in_base.contains(f)).copied();
                (st.tables[1..].to_vec(), own.collect())
            }
            None => (st.tables.clone(), all.clone()),
        };
        let mut packs: Vec<PackId> = olds
            .iter()
            .flat_map(|t| t.packs().iter().copied())
            .collect();
        packs.sort_unstable();
        packs.dedup();
        let mut number: HashMap<PackId, u32> = packs
            .iter()
            .enumerate()
            .map(|(i, p)| (*p, i as u32))
            .collect();
        let mut overlay: Vec<IndexEntry> = st.overlay.values().copied().collect();
        overlay.sort_by_key(|e| e.entry.id);
        let more = overlay
            .iter()
            .chain(incoming)
            .map(|e| e.pack)
            .chain(spilled.iter().flat_map(|s| s.packs().iter().copied()));
        for p in more {
            number.entry(p).or_insert_with(|| {
                packs.push(p);
                (packs.len() - 1) as u32
            });
        }
        let max = olds.iter().map(|t| t.len()).sum::<usize>()
            + overlay.len()
            + incoming.len()
            + spilled_len;
        // Of a blob stored twice, the first source's copy is kept: the old tables, the
        // overlay, the incoming entries, then the spilled ones. Tables' entries go through as bytes,
        // with their pack numbers mapped to the new table's (at 10^8 entries, decoding each,
        // looking its pack up in a hash map and encoding it again was most of a rebuild).
        // A delta leaves out what its base holds (one filter probe each): the overlay takes
        // index files without a lookup (Index::add_entries_only), so its entries may be in the
        // base too, as may an incoming file's or a spilled one.
        let b = base.as_ref();
        let mut inputs = Vec::new();
        inputs.extend(olds.iter().map(|t| table_input(t, &number)));
        inputs.push(not_in(b, memory_input(&overlay, &number)));
        inputs.push(not_in(b, memory_input(incoming, &number)));
        let failure = spilled.as_ref().map(|s| s.failure());
        if let Some(s) = spilled {
            inputs.push(not_in(b, Box::new(s.sorted(&number))));
        }
        // Spilled entries that could not all be read back end early: the error after the last
        // entry fails the table before it is renamed into place, so that no process opens a
        // table short of entries its index files name.
        let short = std::iter::once_with(move || failure.and_then(|f| f.borrow_mut().take()))
            .flatten()
            .map(Err);
        let merged = merge_sorted(inputs).map(Ok).chain(short);
        let files_vec: Vec<IndexId> = files.iter().copied().collect();
        let path = self.dir.join(table_name(&files));
        write_table(
            &path,
            self.repo_id,
            self.config_hash,
            &files_vec,
            &packs,
            merged,
            max as u64,
        )
        .map_err(|e| StoreError::io(&path, e))?;
        // The new table must hold every entry of the old tables: a damaged block,
        // skipped by their iterators, would leave some out of a table that claims their index
        // files. The merge touched every block, so it is known now, without a pass of its own
        // (which read a 5.7 GB table twice at 10^8 entries, as the page cache cannot keep it
        // under a tight memory limit). A damaged table is dropped (with everything this
        // process knew: the next refresh reads it all again), and so is the new one.
        if let Some(t) = olds.iter().find(|t| t.is_damaged()) {
            let _ = std::fs::remove_file(&path);
            let e = StoreError::Corrupt {
                path: t.path().to_owned(),
                what: DAMAGED_TABLE,
                source: crate::error::DecodeError::ChecksumMismatch {
                    got: "a damaged block".into(),
                    expected: "the table's block hashes".into(),
                },
            };
            st.clear();
            return Err(e);
        }
        let table = Table::open(&path).map_err(|e| e.at(&path, "index cache table"))?;
        // Tables built from fewer index files are superseded; another process that still maps
        // one keeps its mapping (the file lives until it is unmapped).
        for other in self.tables() {
            if other != path {
                if let Ok((_, f)) = Table::peek(&other) {
                    if f.iter().all(|x| files.contains(x)) {
                        let _ = std::fs::remove_file(&other);
                    }
                }
            }
        }
        st.tables.truncate(usize::from(base.is_some()));
        st.tables.push(Arc::new(table));
        st.table_files = all.into_iter().collect();
        st.overlay.clear();
        st.overlay_files.clear();
        Ok(())
    }
}

/// One id-sorted input of a merge: entries' bytes, numbered for the new table.
type Input<'a> = Box<dyn Iterator<Item = EntryBytes> + 'a>;

/// A table's entries as an input, with their pack numbers mapped by `number` to the new
/// table's.
fn table_input<'a>(t: &'a Table, number: &HashMap<PackId, u32>) -> Input<'a> {
    let packs: Vec<u32> = t.packs().iter().map(|p| number[p]).collect();
    Box::new(t.raw_side_by_side().map(move |raw| {
        let mut b: EntryBytes = raw.try_into().expect("entries are whole");
        // In range: a block's pack numbers are checked with its hash.
        let pack = packs[pack_number(&b) as usize];
        renumber(&mut b, pack);
        b
    }))
}

/// `input` without the ids `base` holds (a filter probe each), or all of it without a base.
fn not_in<'a>(base: Option<&Arc<Table>>, input: Input<'a>) -> Input<'a> {
    match base {
        Some(b) => {
            let b = Arc::clone(b);
            Box::new(input.filter(move |e| {
                b.get(&ChunkId(e[..32].try_into().expect("an id")))
                    .is_none()
            }))
        }
        None => input,
    }
}

/// Entries in memory as an input, numbered by `number`.
fn memory_input<'a>(entries: &'a [IndexEntry], number: &'a HashMap<PackId, u32>) -> Input<'a> {
    Box::new(
        entries
            .iter()
            .map(move |e| encode_entry(number[&e.pack], &e.entry)),
    )
}

/// Merges id-sorted inputs into one, keeping of equal ids the entry of the earliest input (or,
/// within one input, the first: the entries of index files read in one refresh may name a
/// blob twice). One input (a rebuild's spilled entries, say) goes through without the heap.
fn merge_sorted(inputs: Vec<Input<'_>>) -> Input<'_> {
    let mut inputs: Vec<_> = inputs.into_iter().map(|i| i.peekable()).collect();
    inputs.retain_mut(|i| i.peek().is_some());
    if inputs.len() == 1 {
        let mut last = None;
        return Box::new(inputs.pop().expect("one input").filter(move |e| {
            let id: [u8; 32] = e[..32].try_into().expect("an id");
            last.replace(id) != Some(id)
        }));
    }
    Box::new(merge_heap(
        inputs
            .into_iter()
            .map(|i| Box::new(i) as Input<'_>)
            .collect(),
    ))
}

/// [`merge_sorted`] of several inputs, through a heap.
fn merge_heap(mut inputs: Vec<Input<'_>>) -> impl Iterator<Item = EntryBytes> + '_ {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let key = |e: &EntryBytes, input: usize| {
        Reverse((ChunkId(e[..32].try_into().expect("an id")), input))
    };
    let mut heads = vec![[0u8; super::table::TABLE_ENTRY_LEN]; inputs.len()];
    let mut heap = BinaryHeap::with_capacity(inputs.len());
    for (i, input) in inputs.iter_mut().enumerate() {
        if let Some(e) = input.next() {
            heads[i] = e;
            heap.push(key(&e, i));
        }
    }
    let mut last: Option<ChunkId> = None;
    std::iter::from_fn(move || loop {
        let mut top = heap.peek_mut()?;
        let Reverse((id, i)) = *top;
        let e = heads[i];
        // The input's next entry takes its place at the top, and sinks once.
        match inputs[i].next() {
            Some(next) => {
                heads[i] = next;
                *top = key(&next, i);
            }
            None => {
                std::collections::binary_heap::PeekMut::pop(top);
            }
        }
        if last != Some(id) {
            last = Some(id);
            return Some(e);
        }
    })
}

/// What [`Index::fold`] calls a table that failed its block checks.
const DAMAGED_TABLE: &str = "damaged index cache table";

/// Whether a fold failed on a damaged table (dropped: read everything again) rather than on
/// writing one.
pub(super) fn damaged_table(e: &StoreError) -> bool {
    matches!(e, StoreError::Corrupt { what, .. } if *what == DAMAGED_TABLE)
}
