//! Lookups of many ids in the index, partitioned by id prefix ([`Lookups`]): the way a command
//! finds the rows of every chunk a repository's snapshots refer to when the index table is far
//! larger than its memory.
//!
//! Looking each snapshot's ids up in the table, even sorted, sweeps the whole table once per
//! snapshot: at 10^7 chunks (a 560 MB table) and 100 snapshots, 56 GB read through a 256 MiB
//! memory limit. Here the ids are gathered first: kept in memory while they fit a run, else
//! spilled, sorted runs at a time, to one scratch file per id prefix (written with write(2), so
//! that the kernel writes them back as it needs to; dirty pages of a written mapping would count
//! against a cgroup v1 limit until written back). Then each partition is read back, sorted and
//! merged with the table's slice for that prefix, which is contiguous and small enough to stay
//! in memory while it is searched: the table is read once, the ids written and read once.

use std::path::{Path, PathBuf};

use super::rows::Rows;
use super::spill::{read_records, write_partitioned, Record as SpillRecord, Spill};
use crate::error::StoreError;
use crate::id::ChunkId;

/// An id looked up, and the caller's tag for it (a snapshot's number, an entry's ordinal).
pub type Record = (ChunkId, u64);

/// Records sorted in memory at once: 2^20 of 40 bytes, 40 MiB.
pub const RUN: usize = 1 << 20;
/// Table rows per partition: a partition's slice of the table (56 bytes a row) is about 56 MiB.
const SLICE_ROWS: u64 = 1 << 20;
/// Prefix bits a partition too large for one run is split by again.
const SPLIT_BITS: u32 = 4;

/// In a scratch file: the id, then the tag (u64, little-endian).
impl SpillRecord for Record {
    const LEN: usize = 40;

    fn id(&self) -> &[u8; 32] {
        &self.0 .0
    }

    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0 .0);
        out.extend_from_slice(&self.1.to_le_bytes());
    }

    fn get(raw: &[u8]) -> Self {
        (
            ChunkId(raw[..32].try_into().expect("32 bytes")),
            u64::from_le_bytes(raw[32..40].try_into().expect("8 bytes")),
        )
    }
}

/// Ids to look up in a frozen numbering of the index ([`Rows`]), each with a tag; resolved in
/// id order by [`resolve`](Self::resolve).
pub struct Lookups<'r> {
    rows: &'r Rows,
    scratch: PathBuf,
    /// Records sorted in memory at once.
    run: usize,
    /// Keep one record per id (the lowest tag) rather than one per (id, tag).
    one_per_id: bool,
    /// Prefix bits that choose a partition.
    bits: u32,
    buf: Vec<Record>,
    /// One per partition, made at the first spill.
    parts: Vec<Spill>,
}

impl<'r> Lookups<'r> {
    /// Lookups in `rows`, spilled to scratch files in `scratch` when they outgrow a run.
    /// `one_per_id`: the caller needs only one tag per id (any of them: the lowest is kept),
    /// which lets repeated ids be dropped before they are spilled.
    pub fn new(rows: &'r Rows, scratch: &Path, one_per_id: bool) -> Lookups<'r> {
        Self::with_run(rows, scratch, one_per_id, RUN)
    }

    /// [`new`](Self::new) with runs of `run` records (tests use small ones).
    pub fn with_run(rows: &'r Rows, scratch: &Path, one_per_id: bool, run: usize) -> Lookups<'r> {
        let slices = rows.len().div_ceil(SLICE_ROWS).max(1);
        Lookups {
            rows,
            scratch: scratch.to_owned(),
            run: run.max(2),
            one_per_id,
            bits: slices.next_power_of_two().trailing_zeros().min(16),
            buf: Vec::new(),
            parts: Vec::new(),
        }
    }

    /// Adds an id to look up.
    pub fn push(&mut self, id: ChunkId, tag: u64) -> Result<(), StoreError> {
        self.buf.push((id, tag));
        if self.buf.len() >= self.run {
            self.compact();
            // Spilled when deduplication did not free half the run, so that a run is not
            // sorted again for a few free places.
            if self.buf.len() > self.run / 2 {
                self.spill()?;
            }
        }
        Ok(())
    }

    fn compact(&mut self) {
        sort_dedup(&mut self.buf, self.one_per_id);
    }

    fn io(&self, e: std::io::Error) -> StoreError {
        StoreError::io(&self.scratch, e)
    }

    /// Writes the (sorted) buffer out to the partitions' files.
    fn spill(&mut self) -> Result<(), StoreError> {
        if self.parts.is_empty() {
            self.parts = Spill::many(&self.scratch, 1 << self.bits).map_err(|e| self.io(e))?;
        }
        let buf = std::mem::take(&mut self.buf);
        write_partitioned(&buf, 0, self.bits, &mut self.parts).map_err(|e| self.io(e))?;
        self.buf = buf;
        self.buf.clear();
        Ok(())
    }

    /// Looks every id up, in id order: `f(row, records)` once per distinct id, with its row
    /// (`None`: not indexed) and its records (the same id, ascending tags; one record when
    /// `one_per_id`). Stops at the first error `f` returns.
    pub fn resolve<E: From<StoreError>>(
        mut self,
        mut f: impl FnMut(Option<u64>, &[Record]) -> Result<(), E>,
    ) -> Result<(), E> {
        self.compact();
        if self.parts.is_empty() {
            return resolve_batch(self.rows, &self.buf, &mut f);
        }
        self.spill()?;
        self.buf = Vec::new();
        let parts = std::mem::take(&mut self.parts);
        for part in parts {
            self.resolve_spill(part, self.bits, &mut f)?;
        }
        Ok(())
    }

    /// Resolves the records of one partition file (`bits` prefix bits decided already):
    /// sorted in memory when they fit a run, else split by the next prefix bits first.
    fn resolve_spill<E: From<StoreError>>(
        &self,
        mut part: Spill,
        bits: u32,
        f: &mut impl FnMut(Option<u64>, &[Record]) -> Result<(), E>,
    ) -> Result<(), E> {
        let io = |e| E::from(self.io(e));
        let records = part.records;
        let mut reader = part.reader().map_err(io)?;
        let fits = records <= self.run as u64;
        if !fits && bits + SPLIT_BITS <= 64 {
            let mut subs = Spill::many(&self.scratch, 1 << SPLIT_BITS).map_err(io)?;
            let mut left = records;
            while left > 0 {
                let mut batch: Vec<Record> =
                    read_records(&mut reader, left.min(self.run as u64)).map_err(io)?;
                left -= batch.len() as u64;
                batch.sort_unstable();
                write_partitioned(&batch, bits, SPLIT_BITS, &mut subs).map_err(io)?;
            }
            drop(reader);
            drop(part);
            for sub in subs {
                self.resolve_spill(sub, bits + SPLIT_BITS, f)?;
            }
            return Ok(());
        }
        // Fits, or 64 bits of prefix alike (so nearly all one id, which deduplication shrinks):
        // in runs, each sorted and resolved on its own.
        let mut left = records;
        while left > 0 {
            let mut batch: Vec<Record> =
                read_records(&mut reader, left.min(self.run as u64)).map_err(io)?;
            left -= batch.len() as u64;
            sort_dedup(&mut batch, self.one_per_id);
            resolve_batch(self.rows, &batch, f)?;
        }
        Ok(())
    }
}

fn sort_dedup(records: &mut Vec<Record>, one_per_id: bool) {
    records.sort_unstable();
    if one_per_id {
        records.dedup_by_key(|r| r.0);
    } else {
        records.dedup();
    }
}

/// Resolves sorted, deduplicated records: one sorted pass over the rows, one call per id.
fn resolve_batch<E>(
    rows: &Rows,
    batch: &[Record],
    f: &mut impl FnMut(Option<u64>, &[Record]) -> Result<(), E>,
) -> Result<(), E> {
    // Where each id's records start (u32: a batch is at most one run).
    let starts: Vec<u32> = (0..batch.len())
        .filter(|&i| i == 0 || batch[i].0 != batch[i - 1].0)
        .map(|i| i as u32)
        .collect();
    let mut result = Ok(());
    rows.rows_sorted_by(
        &starts,
        |&s| &batch[s as usize].0,
        |g, row| {
            if result.is_ok() {
                let end = starts.get(g + 1).map_or(batch.len(), |&e| e as usize);
                result = f(row, &batch[starts[g] as usize..end]);
            }
        },
    );
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::IndexEntry;
    use crate::{BlobKind, Compression, PackEntry, PackId};

    fn id(n: u64) -> ChunkId {
        ChunkId(*blake3::hash(&n.to_le_bytes()).as_bytes())
    }

    fn rows_of(ids: &[ChunkId]) -> Rows {
        Rows::in_memory(
            ids.iter()
                .map(|id| IndexEntry {
                    pack: PackId([0; 16]),
                    entry: PackEntry {
                        id: *id,
                        kind: BlobKind::Data,
                        compression: Compression::None,
                        offset: 0,
                        stored_len: 1,
                        raw_len: 1,
                    },
                })
                .collect(),
        )
    }

    /// Every distinct id once, in id order, with its row (or none) and all its tags, whether
    /// the records stay in memory, spill to partitions, or a partition splits again.
    #[test]
    fn resolves_each_id_once_in_order_with_its_tags() {
        let dir = tempfile::tempdir().unwrap();
        let indexed: Vec<ChunkId> = (0..3000).map(id).collect();
        let rows = rows_of(&indexed);
        for (run, one) in [(1 << 20, false), (64, false), (7, false), (64, true)] {
            let mut l = Lookups::with_run(&rows, dir.path(), one, run);
            // Partitions by 2 bits: spills, and partitions larger than a run split again.
            l.bits = 2;
            let mut want = std::collections::BTreeMap::<ChunkId, Vec<u64>>::new();
            for n in 0..4000u64 {
                // 1000 ids not indexed; ids pushed up to three times with tags 0..3, some twice.
                let tag = n % 3;
                for t in [tag, tag, (tag + 1) % 3] {
                    l.push(id(n % 3500 + 100), t).unwrap();
                    want.entry(id(n % 3500 + 100)).or_default().push(t);
                }
            }
            for tags in want.values_mut() {
                tags.sort();
                tags.dedup();
                if one {
                    tags.truncate(1);
                }
            }
            let mut got = std::collections::BTreeMap::new();
            let mut last = None;
            l.resolve::<StoreError>(|row, records| {
                let id = records[0].0;
                assert!(records.iter().all(|r| r.0 == id));
                assert!(last < Some(id), "ids come in order, each once");
                last = Some(id);
                assert_eq!(row, rows.row(&id));
                got.insert(id, records.iter().map(|r| r.1).collect::<Vec<_>>());
                Ok(())
            })
            .unwrap();
            assert_eq!(got, want, "run {run}");
        }
    }

    #[test]
    fn the_first_error_stops_the_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let rows = rows_of(&[]);
        let mut l = Lookups::with_run(&rows, dir.path(), false, 4);
        for n in 0..100 {
            l.push(id(n), n).unwrap();
        }
        let mut calls = 0;
        let r = l.resolve(|row, _| {
            calls += 1;
            assert_eq!(row, None);
            Err(StoreError::BlobMissing(id(0)))
        });
        assert!(matches!(r, Err(StoreError::BlobMissing(_))));
        assert_eq!(calls, 1);
    }
}
