//! The cache's merged index: one immutable, memory-mapped file of every blob of a set of index
//! files, sorted by id, with a Bloom filter in front so that a miss (a new chunk) costs one
//! cache line instead of a binary search.
//!
//! A table is never changed once written: a newer one is written beside it (temporary name,
//! rename), so any number of processes can use the cache at once without locks. It is checked
//! in full when opened (a damaged cache must never make a backup skip a chunk it has not
//! stored) and is not fsynced: after a power loss a torn table fails that check and is rebuilt.
//! Byte layout: docs/format.md, "cache table" (a local file, not part of the repository).

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;

use memmap2::Mmap;

use crate::blob::{BlobKind, Compression};
use crate::codec::{invalid, Decoder, Encoder};
use crate::error::DecodeError;
use crate::id::{ChunkId, IndexId, PackId};
use crate::index::IndexEntry;
use crate::pack::PackEntry;

/// Magic of a cache table. Do not change.
pub const TABLE_MAGIC: &[u8; 8] = b"SBKCACHE";
/// Cache table format version.
pub const TABLE_VERSION: u32 = 1;
/// Size of the fixed header.
pub const TABLE_HEADER_LEN: usize = 136;
/// Size of one entry.
pub const TABLE_ENTRY_LEN: usize = 56;
/// Bytes of one filter block (one cache line).
const BLOCK: usize = 64;
/// Filter bits per entry: about 1% false positives with six probes per 512-bit block.
const BITS_PER_ENTRY: u64 = 10;

/// What a table says about itself, and what it was built for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableHeader {
    /// The repository it indexes.
    pub repo_id: [u8; 16],
    /// BLAKE3 of the repository's config object.
    pub config_hash: [u8; 32],
    /// Index files merged into it.
    pub files: u32,
    /// Packs its entries point into.
    pub packs: u32,
    /// Entries.
    pub entries: u64,
    /// Filter blocks.
    pub blocks: u64,
    /// BLAKE3 of everything after the header.
    pub body_hash: [u8; 32],
}

impl TableHeader {
    fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        e.bytes(TABLE_MAGIC)
            .u32(TABLE_VERSION)
            .u32(0)
            .bytes(&self.repo_id)
            .bytes(&self.config_hash)
            .u32(self.files)
            .u32(self.packs)
            .u64(self.entries)
            .u64(self.blocks)
            .bytes(&self.body_hash);
        e.finish_with_checksum()
    }

    /// Decodes and checks a header (its own checksum, not the body's).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let bytes = bytes
            .get(..TABLE_HEADER_LEN)
            .ok_or(DecodeError::Truncated {
                needed: TABLE_HEADER_LEN,
                available: bytes.len(),
            })?;
        let mut d = Decoder::new(bytes);
        d.magic(TABLE_MAGIC)?;
        let version = d.u32()?;
        if version != TABLE_VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let body = crate::codec::split_checksum(bytes)?;
        let mut d = Decoder::new(&body[12..]);
        crate::codec::reserved(d.u32()?.into(), "table reserved")?;
        let h = TableHeader {
            repo_id: d.array()?,
            config_hash: d.array()?,
            files: d.u32()?,
            packs: d.u32()?,
            entries: d.u64()?,
            blocks: d.u64()?,
            body_hash: d.array()?,
        };
        d.end("table header")?;
        if h.blocks == 0 {
            return Err(invalid("filter blocks", "0"));
        }
        Ok(h)
    }

    /// Length of the whole file this header describes, if it fits in a u64.
    fn file_len(&self) -> Option<u64> {
        (TABLE_HEADER_LEN as u64)
            .checked_add(u64::from(self.files) * 32)?
            .checked_add(u64::from(self.packs) * 16)?
            .checked_add(self.entries.checked_mul(TABLE_ENTRY_LEN as u64)?)?
            .checked_add(self.blocks.checked_mul(BLOCK as u64)?)
    }
}

/// The filter block of an id and the six bits set in it. Ids are keyed hashes, uniformly
/// distributed, so their bytes serve as the filter's hash values directly.
fn probes(id: &ChunkId, blocks: u64) -> (usize, [u16; 6]) {
    let b = u64::from_le_bytes(id.0[..8].try_into().expect("eight bytes")) % blocks;
    let mut bits = [0u16; 6];
    for (i, bit) in bits.iter_mut().enumerate() {
        *bit = u16::from_le_bytes([id.0[8 + 2 * i], id.0[9 + 2 * i]]) & 511;
    }
    (b as usize, bits)
}

/// Filter blocks for `entries` entries.
pub fn blocks_for(entries: u64) -> u64 {
    (entries * BITS_PER_ENTRY).div_ceil(BLOCK as u64 * 8).max(1)
}

fn encode_entry(id: &ChunkId, pack: u32, e: &PackEntry, out: &mut Vec<u8>) {
    let mut enc = Encoder::default();
    enc.bytes(&id.0)
        .u32(pack)
        .u8(e.kind as u8)
        .u8(e.compression as u8)
        .u16(0)
        .u64(e.offset)
        .u32(e.stored_len)
        .u32(e.raw_len);
    out.extend_from_slice(&enc.buf);
}

/// An open, checked table.
pub struct Table {
    map: Mmap,
    header: TableHeader,
    files_at: usize,
    packs_at: usize,
    entries_at: usize,
    filter_at: usize,
    packs: Vec<PackId>,
}

/// Why a table could not be used.
#[derive(Debug)]
pub enum TableError {
    /// Reading it failed.
    Io(std::io::Error),
    /// It is damaged or of another version.
    Bad(DecodeError),
}

impl std::fmt::Display for TableError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TableError::Io(e) => write!(f, "{e}"),
            TableError::Bad(e) => write!(f, "{e}"),
        }
    }
}

impl Table {
    /// Reads just the header and the list of index files of the table at `path`: enough to
    /// choose between tables without checking each in full.
    pub fn peek(path: &Path) -> Result<(TableHeader, Vec<IndexId>), TableError> {
        Self::peek_file(&mut File::open(path).map_err(TableError::Io)?)
    }

    fn peek_file(f: &mut File) -> Result<(TableHeader, Vec<IndexId>), TableError> {
        use std::io::Seek;
        f.seek(std::io::SeekFrom::Start(0))
            .map_err(TableError::Io)?;
        let mut head = vec![0u8; TABLE_HEADER_LEN];
        f.read_exact(&mut head).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => TableError::Bad(DecodeError::Truncated {
                needed: TABLE_HEADER_LEN,
                available: 0,
            }),
            _ => TableError::Io(e),
        })?;
        let header = TableHeader::decode(&head).map_err(TableError::Bad)?;
        let len = f.metadata().map_err(TableError::Io)?.len();
        if header.file_len() != Some(len) {
            return Err(TableError::Bad(invalid(
                "table length",
                format!("{len} bytes, the header describes {:?}", header.file_len()),
            )));
        }
        let mut files = vec![0u8; header.files as usize * 32];
        f.read_exact(&mut files).map_err(TableError::Io)?;
        let files = files
            .chunks_exact(32)
            .map(|c| IndexId(c.try_into().expect("chunks of 32")))
            .collect();
        Ok((header, files))
    }

    /// Opens the table at `path`, checking every byte against the header's hash. The check
    /// reads through the page cache (not the mapping), so only the pages lookups touch count
    /// towards the process's memory.
    pub fn open(path: &Path) -> Result<Table, TableError> {
        // One handle throughout: another process may rename a new table over this name.
        let mut f = File::open(path).map_err(TableError::Io)?;
        let (header, _) = Self::peek_file(&mut f)?;
        use std::io::Seek;
        f.seek(std::io::SeekFrom::Start(0))
            .map_err(TableError::Io)?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut head = [0u8; TABLE_HEADER_LEN];
        f.read_exact(&mut head).map_err(TableError::Io)?;
        loop {
            let n = f.read(&mut buf).map_err(TableError::Io)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        if hasher.finalize().as_bytes() != &header.body_hash {
            return Err(TableError::Bad(DecodeError::ChecksumMismatch {
                got: hasher.finalize().to_hex().to_string(),
                expected: crate::id::to_hex(&header.body_hash),
            }));
        }
        // SAFETY: the file is never modified once written (new tables get new names through a
        // rename), so the mapping cannot change under us; we only read it.
        #[allow(unsafe_code)]
        let map = unsafe { Mmap::map(&f) }.map_err(TableError::Io)?;
        if map.len() as u64 != header.file_len().unwrap_or(0) {
            return Err(TableError::Bad(invalid(
                "table length",
                "changed while open",
            )));
        }
        let files_at = TABLE_HEADER_LEN;
        let packs_at = files_at + header.files as usize * 32;
        let entries_at = packs_at + header.packs as usize * 16;
        let filter_at = entries_at + header.entries as usize * TABLE_ENTRY_LEN;
        let packs = map[packs_at..entries_at]
            .chunks_exact(16)
            .map(|c| PackId(c.try_into().expect("chunks of 16")))
            .collect();
        let t = Table {
            map,
            header,
            files_at,
            packs_at,
            entries_at,
            filter_at,
            packs,
        };
        // Entries must be sorted and point at listed packs, or lookups would be wrong.
        let mut prev: Option<&[u8]> = None;
        for i in 0..t.header.entries as usize {
            let raw = t.raw(i);
            if prev.is_some_and(|p| p >= &raw[..32]) {
                return Err(TableError::Bad(invalid(
                    "table order",
                    format!("entry {i}"),
                )));
            }
            t.decode(raw).map_err(TableError::Bad)?;
            prev = Some(&raw[..32]);
        }
        Ok(t)
    }

    /// The index files merged into this table.
    pub fn files(&self) -> impl Iterator<Item = IndexId> + '_ {
        self.map[self.files_at..self.packs_at]
            .chunks_exact(32)
            .map(|c| IndexId(c.try_into().expect("chunks of 32")))
    }

    /// The packs entries point into, by their number in the table.
    pub fn packs(&self) -> &[PackId] {
        &self.packs
    }

    fn raw(&self, i: usize) -> &[u8] {
        let at = self.entries_at + i * TABLE_ENTRY_LEN;
        &self.map[at..at + TABLE_ENTRY_LEN]
    }

    fn decode(&self, raw: &[u8]) -> Result<IndexEntry, DecodeError> {
        let mut d = Decoder::new(raw);
        let id = ChunkId(d.array()?);
        let pack = d.u32()?;
        let kind = BlobKind::from_u8(d.u8()?)?;
        let compression = Compression::from_u8(d.u8()?)?;
        crate::codec::reserved(d.u16()?.into(), "table entry reserved")?;
        let pack = *self
            .packs
            .get(pack as usize)
            .ok_or_else(|| invalid("table pack number", format!("{pack}")))?;
        Ok(IndexEntry {
            pack,
            entry: PackEntry {
                id,
                kind,
                compression,
                offset: d.u64()?,
                stored_len: d.u32()?,
                raw_len: d.u32()?,
            },
        })
    }

    /// True when the filter says `id` may be in the table (false: it certainly is not).
    fn may_contain(&self, id: &ChunkId) -> bool {
        let (block, bits) = probes(id, self.header.blocks);
        let b = &self.map[self.filter_at + block * BLOCK..][..BLOCK];
        bits.iter()
            .all(|&bit| b[bit as usize / 8] & (1 << (bit % 8)) != 0)
    }

    /// Looks a blob up.
    pub fn get(&self, id: &ChunkId) -> Option<IndexEntry> {
        self.position(id).and_then(|i| self.entry_at(i))
    }

    /// The position of a blob in the table's id order (its row), if it is there.
    pub fn position(&self, id: &ChunkId) -> Option<usize> {
        if !self.may_contain(id) {
            return None;
        }
        let (mut lo, mut hi) = (0usize, self.header.entries as usize);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.raw(mid)[..32].cmp(&id.0[..]) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(mid),
            }
        }
        None
    }

    /// The positions of `ids`, which must be sorted: `f(i, position)` for each in turn. Each
    /// search gallops forward from where the last one ended, so a sorted batch reads the
    /// table front to back once instead of binary-searching it from the top for each id.
    pub fn positions_sorted(&self, ids: &[ChunkId], mut f: impl FnMut(usize, Option<usize>)) {
        let n = self.len();
        let mut lo = 0usize;
        for (i, id) in ids.iter().enumerate() {
            if !self.may_contain(id) {
                f(i, None);
                continue;
            }
            // The first position at or after `lo` whose id is not less than `id`: gallop to a
            // bound, then search between.
            let less = |at: usize| self.raw(at)[..32] < id.0[..];
            let mut step = 1usize;
            let mut hi = lo;
            while hi < n && less(hi) {
                lo = hi + 1;
                hi = lo.saturating_add(step).min(n);
                step = step.saturating_mul(2);
            }
            let (mut a, mut b) = (lo, hi.min(n));
            while a < b {
                let mid = a + (b - a) / 2;
                if less(mid) {
                    a = mid + 1;
                } else {
                    b = mid;
                }
            }
            lo = a;
            f(i, (a < n && self.raw(a)[..32] == id.0[..]).then_some(a));
        }
    }

    /// The entry at position `i` (`None` past the end; entries were checked when the table was
    /// opened, so a decode cannot fail).
    pub fn entry_at(&self, i: usize) -> Option<IndexEntry> {
        if i >= self.len() {
            return None;
        }
        self.decode(self.raw(i)).ok()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.header.entries as usize
    }

    /// Every entry, in id order.
    pub fn iter(&self) -> impl Iterator<Item = IndexEntry> + '_ {
        (0..self.len()).filter_map(|i| self.decode(self.raw(i)).ok())
    }
}

/// Writes a table to `path` (through a temporary name and a rename, so that readers see the
/// whole table or none). `entries` must be sorted by id without duplicates, and name only packs
/// in `packs`; `max_entries` bounds their number (it sizes the filter).
pub fn write_table(
    path: &Path,
    repo_id: [u8; 16],
    config_hash: [u8; 32],
    files: &[IndexId],
    packs: &[PackId],
    entries: impl Iterator<Item = (ChunkId, u32, PackEntry)>,
    max_entries: u64,
) -> std::io::Result<()> {
    let dir = path.parent().expect("tables live in a directory");
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().expect("named").to_string_lossy(),
        crate::id::to_hex(&crate::id::random_bytes::<8>()?)
    ));
    let result = (|| {
        let mut out = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        out.write_all(&[0u8; TABLE_HEADER_LEN])?;
        let mut hasher = blake3::Hasher::new();
        let mut put = |out: &mut BufWriter<File>, b: &[u8]| {
            hasher.update(b);
            out.write_all(b)
        };
        for f in files {
            put(&mut out, &f.0)?;
        }
        for p in packs {
            put(&mut out, &p.0)?;
        }
        let blocks = blocks_for(max_entries);
        let mut filter = vec![0u8; blocks as usize * BLOCK];
        let mut count = 0u64;
        let mut buf = Vec::with_capacity(TABLE_ENTRY_LEN);
        for (id, pack, e) in entries {
            buf.clear();
            encode_entry(&id, pack, &e, &mut buf);
            put(&mut out, &buf)?;
            let (block, bits) = probes(&id, blocks);
            for bit in bits {
                filter[block * BLOCK + bit as usize / 8] |= 1 << (bit % 8);
            }
            count += 1;
        }
        put(&mut out, &filter)?;
        let header = TableHeader {
            repo_id,
            config_hash,
            files: files.len() as u32,
            packs: packs.len() as u32,
            entries: count,
            blocks,
            body_hash: *hasher.finalize().as_bytes(),
        };
        let mut file = out.into_inner().map_err(|e| e.into_error())?;
        use std::io::Seek;
        file.seek(std::io::SeekFrom::Start(0))?;
        file.write_all(&header.encode())?;
        drop(file);
        // No fsync: the cache is rebuilt from the repository whenever a table fails its check.
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: ChunkId, offset: u64) -> PackEntry {
        PackEntry {
            id,
            kind: BlobKind::Data,
            compression: Compression::Zstd,
            offset,
            stored_len: 10,
            raw_len: 20,
        }
    }

    #[test]
    fn written_tables_answer_lookups_and_damage_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.tbl");
        let mut ids: Vec<ChunkId> = (0..5000u32)
            .map(|i| ChunkId(*blake3::hash(&i.to_le_bytes()).as_bytes()))
            .collect();
        ids.sort();
        let packs = [PackId([1; 16]), PackId([2; 16])];
        write_table(
            &path,
            [7; 16],
            [8; 32],
            &[IndexId([9; 32])],
            &packs,
            ids.iter()
                .enumerate()
                .map(|(i, id)| (*id, (i % 2) as u32, entry(*id, 16 + i as u64))),
            ids.len() as u64,
        )
        .unwrap();
        let t = Table::open(&path).unwrap();
        assert_eq!(t.len(), 5000);
        assert_eq!(t.files().collect::<Vec<_>>(), vec![IndexId([9; 32])]);
        for (i, id) in ids.iter().enumerate() {
            let e = t.get(id).unwrap();
            assert_eq!(e.pack, packs[i % 2]);
            assert_eq!(e.entry.offset, 16 + i as u64);
        }
        let mut false_positives = 0;
        for i in 5000..15000u32 {
            let id = ChunkId(*blake3::hash(&i.to_le_bytes()).as_bytes());
            assert!(t.get(&id).is_none());
            false_positives += usize::from(t.may_contain(&id));
        }
        assert!(
            false_positives < 400,
            "{false_positives} of 10000 pass the filter"
        );
        assert_eq!(t.iter().count(), 5000);
        // Batches of sorted ids, present and absent, dense and sparse, find what one-by-one
        // lookups find.
        let absent = (5000..8000u32).map(|i| ChunkId(*blake3::hash(&i.to_le_bytes()).as_bytes()));
        for stride in [1, 3, 97, 4999] {
            let mut batch: Vec<ChunkId> = ids.iter().step_by(stride).copied().collect();
            batch.extend(absent.clone().step_by(stride));
            batch.push(ids[0]);
            batch.sort();
            let mut got = Vec::new();
            t.positions_sorted(&batch, |i, p| got.push((i, p)));
            let want: Vec<_> = batch
                .iter()
                .enumerate()
                .map(|(i, id)| (i, t.position(id)))
                .collect();
            assert_eq!(got, want, "stride {stride}");
        }
        drop(t);
        let bytes = std::fs::read(&path).unwrap();
        for at in [
            0,
            50,
            TABLE_HEADER_LEN + 3,
            bytes.len() / 2,
            bytes.len() - 1,
        ] {
            let mut bad = bytes.clone();
            bad[at] ^= 1;
            std::fs::write(&path, &bad).unwrap();
            assert!(Table::open(&path).is_err(), "flip at {at}");
        }
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(Table::open(&path).is_err());
    }
}
