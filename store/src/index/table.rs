//! The cache's merged index: one immutable, memory-mapped file of every blob of a set of index
//! files, sorted by id, with a Bloom filter in front so that a miss (a new chunk) costs one
//! cache line instead of a binary search.
//!
//! A table is never changed once written: a newer one is written beside it (temporary name,
//! rename), so any number of processes can use the cache at once without locks. A damaged
//! cache must never make a backup skip a chunk it has not stored, yet checking a table of 10^8
//! entries (5.6 GB) in full on every open would cost seconds: so the header holds a hash of the
//! table's *directory* (index files, packs, and a BLAKE3 of every block of 1024 entries and of
//! every group of 64 filter blocks, a page), checked when the table is opened, and each block is
//! checked against its hash the first time it is touched. A block that fails marks the table
//! damaged: lookups in it find nothing (a chunk is stored again, never skipped) and the index
//! rebuilds the cache. Not fsynced: after a power loss a torn table fails those checks.
//! Byte layout: docs/format.md, "cache table" (a local file, not part of the repository).

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use memmap2::Mmap;

use crate::codec::{invalid, Decoder, Encoder};
use crate::error::DecodeError;
use crate::id::{ChunkId, IndexId, PackId};
use crate::index::filter::{blocks_for, probes, FilterWriter, BLOCK};
use crate::index::IndexEntry;
use crate::pack::PackEntry;

/// Magic of a cache table. Do not change.
pub const TABLE_MAGIC: &[u8; 8] = b"SBKCACHE";
/// Cache table format version (4: filter blocks checked a page at a time; 3: an id's filter
/// block follows its id order; 2: blocks checked as they are touched).
pub const TABLE_VERSION: u32 = 4;
/// Size of the fixed header.
pub const TABLE_HEADER_LEN: usize = 136;
/// Size of one entry.
pub const TABLE_ENTRY_LEN: usize = 56;
/// Entries per checked block (56 KiB).
const CHECK_UNIT: u64 = 1024;
/// Filter blocks per checked group: one page (4 KiB). A lookup of a new chunk reads one filter
/// block and the group its check hashes; at 64 KiB groups (version 3), a backup into a table
/// whose pages a memory limit had evicted read and hashed 64 KiB for each of them.
const FILTER_UNIT: u64 = 64;

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
    /// BLAKE3 of the directory: the index file ids, the pack ids and the block hashes.
    pub directory_hash: [u8; 32],
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
            .bytes(&self.directory_hash);
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
            directory_hash: d.array()?,
        };
        d.end("table header")?;
        if h.blocks == 0 {
            return Err(invalid("filter blocks", "0"));
        }
        Ok(h)
    }

    /// Block hashes: one per [`CHECK_UNIT`] entries, then one per [`FILTER_UNIT`] filter blocks.
    fn hashes(&self) -> u64 {
        self.entries.div_ceil(CHECK_UNIT) + self.blocks.div_ceil(FILTER_UNIT)
    }

    /// Length of the whole file this header describes, if it fits in a u64.
    fn file_len(&self) -> Option<u64> {
        (TABLE_HEADER_LEN as u64)
            .checked_add(u64::from(self.files) * 32)?
            .checked_add(u64::from(self.packs) * 16)?
            .checked_add(self.entries.checked_mul(TABLE_ENTRY_LEN as u64)?)?
            .checked_add(self.blocks.checked_mul(BLOCK as u64)?)?
            .checked_add(self.hashes().checked_mul(32)?)
    }
}

/// The bytes of a table entry.
pub type EntryBytes = [u8; TABLE_ENTRY_LEN];

/// A blob's entry in a table whose pack number `pack` is its pack.
pub fn encode_entry(pack: u32, e: &PackEntry) -> EntryBytes {
    let mut b = [0u8; TABLE_ENTRY_LEN];
    b[..32].copy_from_slice(&e.id.0);
    b[32..36].copy_from_slice(&pack.to_le_bytes());
    b[36] = e.kind as u8;
    b[37] = e.compression as u8;
    b[40..48].copy_from_slice(&e.offset.to_le_bytes());
    b[48..52].copy_from_slice(&e.stored_len.to_le_bytes());
    b[52..56].copy_from_slice(&e.raw_len.to_le_bytes());
    b
}

/// Decodes an entry's bytes, its pack number into `packs`.
pub fn decode_entry(raw: &[u8], packs: &[PackId]) -> Result<IndexEntry, DecodeError> {
    let mut d = Decoder::new(raw);
    let id = ChunkId(d.array()?);
    let pack = d.u32()?;
    let entry = PackEntry::decode_after_id(id, &mut d, "table entry reserved")?;
    let pack = *packs
        .get(pack as usize)
        .ok_or_else(|| invalid("table pack number", format!("{pack}")))?;
    Ok(IndexEntry { pack, entry })
}

/// Gives an entry's bytes pack number `pack` (of another table).
pub fn renumber(b: &mut EntryBytes, pack: u32) {
    b[32..36].copy_from_slice(&pack.to_le_bytes());
}

/// An entry's pack number.
pub fn pack_number(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[32..36].try_into().expect("an entry"))
}

/// An open table: its directory checked, its blocks checked as they are touched.
pub struct Table {
    path: PathBuf,
    map: Mmap,
    header: TableHeader,
    files_at: usize,
    packs_at: usize,
    hashes_at: usize,
    entries_at: usize,
    filter_at: usize,
    packs: Vec<PackId>,
    /// A bit per checked unit (entry blocks, then filter groups): checked and sound.
    checked: Vec<AtomicU64>,
    /// Set once a unit failed its check.
    damaged: AtomicBool,
}

/// Why a table could not be used.
#[derive(Debug)]
pub enum TableError {
    /// Reading it failed.
    Io(std::io::Error),
    /// It is damaged or of another version.
    Bad(DecodeError),
}

impl TableError {
    /// The store's error for table (or run) `what` at `path`.
    pub(crate) fn at(self, path: &Path, what: &'static str) -> crate::error::StoreError {
        match self {
            TableError::Io(source) => crate::error::StoreError::io(path, source),
            TableError::Bad(source) => crate::error::StoreError::Corrupt {
                path: path.to_owned(),
                what,
                source,
            },
        }
    }
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

    /// Opens the table at `path`, checking its directory against the header's hash (read
    /// through the page cache, not the mapping). The entries and the filter are checked block by
    /// block as lookups touch them.
    pub fn open(path: &Path) -> Result<Table, TableError> {
        // One handle throughout: another process may rename a new table over this name.
        let mut f = File::open(path).map_err(TableError::Io)?;
        let (header, _) = Self::peek_file(&mut f)?;
        // The directory: the index file and pack ids after the header, the block hashes at
        // the end of the file.
        let lists = u64::from(header.files) * 32 + u64::from(header.packs) * 16;
        let hashes = header.hashes() * 32;
        let len = header.file_len().unwrap_or(0);
        let mut hasher = blake3::Hasher::new();
        for (at, n) in [(TABLE_HEADER_LEN as u64, lists), (len - hashes, hashes)] {
            use std::io::Seek;
            f.seek(std::io::SeekFrom::Start(at))
                .map_err(TableError::Io)?;
            std::io::copy(&mut (&mut f).take(n), &mut hasher).map_err(TableError::Io)?;
        }
        if hasher.finalize().as_bytes() != &header.directory_hash {
            return Err(TableError::Bad(DecodeError::ChecksumMismatch {
                got: hasher.finalize().to_hex().to_string(),
                expected: crate::id::to_hex(&header.directory_hash),
            }));
        }
        // SAFETY: the file is never modified once written (new tables get new names through a
        // rename), so the mapping cannot change under us; we only read it. (A table damaged on
        // disk fails its block checks.)
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
        let hashes_at = filter_at + header.blocks as usize * BLOCK;
        let packs = map[packs_at..entries_at]
            .chunks_exact(16)
            .map(|c| PackId(c.try_into().expect("chunks of 16")))
            .collect();
        let checked = (0..header.hashes().div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        // No readahead of the kernel's own: a fault would read up to `read_ahead_kb` around
        // it (8 MiB on some machines), and a lookup touches one filter block and a few entry
        // blocks. Under a memory limit, where a backup's pack writes evict the table's pages
        // as they go, every lookup of a new chunk read megabytes. Readers that do go in order
        // ask for what they need ahead themselves ([`Table::prefetch`]), and a block is asked
        // for whole before its check hashes it. Advice only: a mapping that ignores it is
        // read as before.
        let _ = map.advise(memmap2::Advice::Random);
        Ok(Table {
            path: path.to_owned(),
            map,
            header,
            files_at,
            packs_at,
            hashes_at,
            entries_at,
            filter_at,
            packs,
            checked,
            damaged: AtomicBool::new(false),
        })
    }

    /// The file the table was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether a block failed its check (the table should be rebuilt).
    pub fn is_damaged(&self) -> bool {
        self.damaged.load(Ordering::Relaxed)
    }

    /// Checks every block not checked yet: true when the whole table is sound.
    pub fn check_all(&self) -> bool {
        (0..self.header.hashes()).all(|u| self.check_unit(u))
    }

    /// Where checked unit `u` is in the mapping (entry blocks, then filter groups): offset and
    /// length.
    fn unit_span(&self, u: u64) -> (usize, usize) {
        let entry_blocks = self.header.entries.div_ceil(CHECK_UNIT);
        let (at, len) = if u < entry_blocks {
            let first = u * CHECK_UNIT;
            let n = CHECK_UNIT.min(self.header.entries - first);
            (
                self.entries_at + first as usize * TABLE_ENTRY_LEN,
                n as usize * TABLE_ENTRY_LEN,
            )
        } else {
            let first = (u - entry_blocks) * FILTER_UNIT;
            let n = FILTER_UNIT.min(self.header.blocks - first);
            (self.filter_at + first as usize * BLOCK, n as usize * BLOCK)
        };
        (at, len)
    }

    /// Whether unit `u` was checked already.
    fn is_checked(&self, u: u64) -> bool {
        let (word, bit) = ((u / 64) as usize, 1u64 << (u % 64));
        self.checked[word].load(Ordering::Acquire) & bit != 0
    }

    /// Checks unit `u` against its hash the first time; false when it is damaged.
    fn check_unit(&self, u: u64) -> bool {
        if self.is_checked(u) {
            return true;
        }
        let (at, len) = self.unit_span(u);
        // In one read, not a fault per page (see `open`).
        self.will_need(at, len);
        let bytes = &self.map[at..at + len];
        let at = self.hashes_at + u as usize * 32;
        let mut sound = blake3::hash(bytes).as_bytes() == &self.map[at..at + 32];
        let entry_blocks = self.header.entries.div_ceil(CHECK_UNIT);
        if sound && u < entry_blocks {
            // Sound bytes were written sorted, with pack numbers in range; decoding them once
            // more costs little next to the hash, and catches a writer's bug as damage.
            sound = bytes
                .chunks_exact(TABLE_ENTRY_LEN)
                .all(|raw| self.decode(raw).is_ok())
                && bytes
                    .chunks_exact(TABLE_ENTRY_LEN)
                    .zip(bytes.chunks_exact(TABLE_ENTRY_LEN).skip(1))
                    .all(|(a, b)| a[..32] < b[..32]);
        }
        if sound {
            self.checked[(u / 64) as usize].fetch_or(1 << (u % 64), Ordering::AcqRel);
        } else if !self.damaged.swap(true, Ordering::AcqRel) {
            // The next process rebuilds the cache rather than trip over the same block; this
            // one's mapping stays valid.
            let _ = std::fs::remove_file(&self.path);
        }
        sound
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

    /// Entry `i`'s bytes, once its block is checked (`None`: the block is damaged).
    fn raw(&self, i: usize) -> Option<&[u8]> {
        if !self.check_unit(i as u64 / CHECK_UNIT) {
            return None;
        }
        let at = self.entries_at + i * TABLE_ENTRY_LEN;
        Some(&self.map[at..at + TABLE_ENTRY_LEN])
    }

    fn decode(&self, raw: &[u8]) -> Result<IndexEntry, DecodeError> {
        decode_entry(raw, &self.packs)
    }

    /// The filter block of `id`, and the checked unit holding it.
    fn filter_block(&self, id: &ChunkId) -> (usize, [u16; 6], u64) {
        let (block, bits) = probes(&id.0, self.header.blocks);
        let unit = self.header.entries.div_ceil(CHECK_UNIT) + block as u64 / FILTER_UNIT;
        (block, bits, unit)
    }

    /// Asks the kernel ahead for what a lookup of `id` reads first (advice only): its filter
    /// block, or the whole group of blocks its check hashes if that is not checked yet. A
    /// caller that knows the ids it will look up in a moment (a backup worker, a segment's
    /// chunks) then finds the pages there instead of waiting on a read for each.
    pub fn prefetch(&self, id: &ChunkId) {
        let (block, _, unit) = self.filter_block(id);
        if self.is_checked(unit) {
            self.will_need(self.filter_at + block * BLOCK, BLOCK);
        } else {
            let (at, len) = self.unit_span(unit);
            self.will_need(at, len);
        }
    }

    /// True when the filter says `id` may be in the table (false: it certainly is not). A
    /// damaged filter group says "may": the entries, checked themselves, decide.
    fn may_contain(&self, id: &ChunkId) -> bool {
        let (block, bits, unit) = self.filter_block(id);
        if !self.check_unit(unit) {
            return true;
        }
        let b = &self.map[self.filter_at + block * BLOCK..][..BLOCK];
        bits.iter()
            .all(|&bit| b[bit as usize / 8] & (1 << (bit % 8)) != 0)
    }

    /// Looks a blob up.
    pub fn get(&self, id: &ChunkId) -> Option<IndexEntry> {
        self.position(id).and_then(|i| self.entry_at(i))
    }

    /// The position of a blob in the table's id order (its row), if it is there.
    ///
    /// Ids are keyed hashes, spread evenly: an id's row is close to its share of the id space
    /// times the row count (within a few thousand rows at 10^8 entries), so the search starts
    /// there and gallops outwards instead of bisecting the whole table. A lookup the filter
    /// lets through touches a few blocks near the guess; bisection touched 15 or more far
    /// apart, each a page fault and a 56 KiB block check under a memory limit (at 10^8, the
    /// filter's 1% false positives were most of a backup's reads). Ids spread unevenly only
    /// gallop further.
    pub fn position(&self, id: &ChunkId) -> Option<usize> {
        use std::cmp::Ordering::{Equal, Greater, Less};
        if !self.may_contain(id) {
            return None;
        }
        let n = self.header.entries as usize;
        if n == 0 {
            return None;
        }
        // A damaged block answers nothing: its ids are not found.
        let cmp = |at: usize| self.raw(at).map(|r| r[..32].cmp(&id.0[..]));
        let prefix = u64::from_be_bytes(id.0[..8].try_into().expect("eight bytes"));
        let guess = ((u128::from(prefix) * n as u128) >> 64) as usize;
        // Every entry before `lo` is less than `id`, every one from `hi` on greater.
        let (mut lo, mut hi) = (0, n);
        let mut step = 1usize;
        match cmp(guess)? {
            Equal => return Some(guess),
            Less => {
                lo = guess + 1;
                loop {
                    let at = lo.saturating_add(step - 1);
                    if at >= n {
                        break;
                    }
                    match cmp(at)? {
                        Less => lo = at + 1,
                        Equal => return Some(at),
                        Greater => {
                            hi = at;
                            break;
                        }
                    }
                    step = step.saturating_mul(2);
                }
            }
            Greater => {
                hi = guess;
                while hi > 0 {
                    let at = hi - step.min(hi);
                    match cmp(at)? {
                        Less => {
                            lo = at + 1;
                            break;
                        }
                        Equal => return Some(at),
                        Greater => hi = at,
                    }
                    step = step.saturating_mul(2);
                }
            }
        }
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match cmp(mid)? {
                Less => lo = mid + 1,
                Greater => hi = mid,
                Equal => return Some(mid),
            }
        }
        None
    }

    /// A search for ids in ascending order, each starting where the last one ended
    /// ([`Cursor::seek`]).
    pub fn cursor(&self) -> Cursor<'_> {
        Cursor {
            t: self,
            lo: 0,
            ahead: Ahead::default(),
        }
    }

    /// The entry at position `i` (`None` past the end; entries were checked when the table was
    /// opened, so a decode cannot fail).
    pub fn entry_at(&self, i: usize) -> Option<IndexEntry> {
        if i >= self.len() {
            return None;
        }
        self.decode(self.raw(i)?).ok()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.header.entries as usize
    }

    /// Every entry, in id order (those of damaged blocks left out: see [`Table::is_damaged`]).
    pub fn iter(&self) -> impl Iterator<Item = IndexEntry> + '_ {
        self.raw_side_by_side()
            .filter_map(|raw| self.decode(raw).ok())
    }

    /// Every entry's bytes, in id order (those of damaged blocks left out), for one of many
    /// tables read side by side (a merge of sorted runs): the mapping has no readahead of the
    /// kernel's own ([`Table::open`]), and each window of [`PREFETCH_BYTES`] and the one after it are
    /// asked for as the reader reaches it. With the kernel's readahead (8 MiB a stream on some
    /// machines) a merge of 190 runs at 10^8 chunks under a 256 MiB limit evicted pages before
    /// they were read: 800 GB read for 6 GB of runs.
    pub fn raw_side_by_side(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let mut ahead = Ahead::default();
        (0..self.len()).filter_map(move |i| {
            ahead.reach(self, i);
            self.raw(i)
        })
    }

    /// Asks the kernel for `len` bytes of the mapping from `at` on (advice only).
    fn will_need(&self, at: usize, len: usize) {
        let len = len.min(self.map.len().saturating_sub(at));
        if len > 0 {
            let _ = self.map.advise_range(memmap2::Advice::WillNeed, at, len);
        }
    }
}

/// A reader's prefetch, for readers that go through the entries in order (the mapping has no
/// readahead of its own; see [`Table::open`]): the window of [`PREFETCH_BYTES`] a reader enters
/// is asked for with the one after it, so that the next is on its way while this one is read.
/// A reader that jumps further than a window (a sorted batch of lookups spread thinly over
/// the table) asks for nothing where it lands: the check of the block it lands in reads what
/// it needs, and the reader's next step shows whether it goes on in order from there.
#[derive(Default)]
struct Ahead {
    /// Entries before this one were asked for.
    until: usize,
}

impl Ahead {
    /// The reader is at entry `i`.
    fn reach(&mut self, t: &Table, i: usize) {
        let window = (PREFETCH_BYTES / TABLE_ENTRY_LEN).max(1);
        if i >= self.until + window {
            self.until = i + 1;
        } else if i + window / 2 >= self.until {
            t.will_need(t.entries_at + i * TABLE_ENTRY_LEN, 2 * PREFETCH_BYTES);
            self.until = i + 2 * window;
        }
    }
}

/// A forward-only search of a table for ids in ascending order: each gallops forward from where
/// the last one ended, so a sorted batch reads the table front to back once instead of
/// binary-searching it from the top for each id. No Bloom filter here: a sorted batch would
/// read its 125 MB at 10^8 entries (evicted and read again under a memory limit) besides the
/// entries, while the gallop itself reads the table in order and settles an absent id as
/// cheaply as a present one.
pub struct Cursor<'a> {
    t: &'a Table,
    lo: usize,
    ahead: Ahead,
}

impl Cursor<'_> {
    /// The position of `id`, which must not be less than the last id sought, if it is in the
    /// table. (A damaged block reads as "less", and its ids are not found.)
    pub fn seek(&mut self, id: &ChunkId) -> Option<usize> {
        let t = self.t;
        let n = t.len();
        let less = |at: usize| t.raw(at).is_none_or(|r| r[..32] < id.0[..]);
        // The first position at or after `lo` whose id is not less than `id`: gallop to a
        // bound, then search between.
        let mut step = 1usize;
        let mut hi = self.lo;
        while hi < n && less(hi) {
            self.lo = hi + 1;
            hi = self.lo.saturating_add(step).min(n);
            step = step.saturating_mul(2);
        }
        let (mut a, mut b) = (self.lo, hi.min(n));
        while a < b {
            let mid = a + (b - a) / 2;
            if less(mid) {
                a = mid + 1;
            } else {
                b = mid;
            }
        }
        self.lo = a;
        self.ahead.reach(t, a);
        (a < n && t.raw(a).is_some_and(|r| r[..32] == id.0[..])).then_some(a)
    }
}

/// Bytes of a table asked for ahead of a reader that reads it beside many others.
const PREFETCH_BYTES: usize = 256 << 10;

/// Writes a table to `path` (through a temporary name and a rename, so that readers see the
/// whole table or none). `entries` must be sorted by id without duplicates, and name only packs
/// in `packs` (by their number in it: [`encode_entry`]); `max_entries` bounds their number (it
/// sizes the filter). An error among them fails the table, which is then never renamed into
/// place.
pub fn write_table(
    path: &Path,
    repo_id: [u8; 16],
    config_hash: [u8; 32],
    files: &[IndexId],
    packs: &[PackId],
    entries: impl Iterator<Item = std::io::Result<EntryBytes>>,
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
        // The directory hash covers the ids lists now and the block hashes at the end.
        let mut directory = blake3::Hasher::new();
        for f in files {
            directory.update(&f.0);
            out.write_all(&f.0)?;
        }
        for p in packs {
            directory.update(&p.0);
            out.write_all(&p.0)?;
        }
        let blocks = blocks_for(max_entries);
        let mut filter = FilterWriter::new(blocks, dir)?;
        let mut count = 0u64;
        let mut hashes = Vec::new();
        // A whole checked unit is hashed at once: BLAKE3 hashes 56 KiB with all its SIMD lanes,
        // 56 bytes at a time with one.
        let mut unit = Vec::with_capacity(CHECK_UNIT as usize * TABLE_ENTRY_LEN);
        let mut end_unit = |unit: &mut Vec<u8>, out: &mut BufWriter<File>| {
            hashes.push(*blake3::hash(unit).as_bytes());
            let written = out.write_all(unit);
            unit.clear();
            written
        };
        for e in entries {
            let e = e?;
            filter.add(&e[..32])?;
            unit.extend_from_slice(&e);
            count += 1;
            if count.is_multiple_of(CHECK_UNIT) {
                end_unit(&mut unit, &mut out)?;
            }
        }
        if !unit.is_empty() {
            end_unit(&mut unit, &mut out)?;
        }
        filter.finish(FILTER_UNIT, |group| {
            out.write_all(group)?;
            hashes.push(*blake3::hash(group).as_bytes());
            Ok(())
        })?;
        for h in &hashes {
            directory.update(h);
            out.write_all(h)?;
        }
        let header = TableHeader {
            repo_id,
            config_hash,
            files: files.len() as u32,
            packs: packs.len() as u32,
            entries: count,
            blocks,
            directory_hash: *directory.finalize().as_bytes(),
        };
        let mut file = out.into_inner().map_err(|e| e.into_error())?;
        use std::io::Seek;
        file.seek(std::io::SeekFrom::Start(0))?;
        file.write_all(&header.encode())?;
        drop(file);
        // No fsync: the cache is rebuilt from the repository whenever a table fails its checks.
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
    use crate::blob::{BlobKind, Compression};

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

    /// Writes a table of `ids`, all in one pack, its filter sized for `max` entries.
    fn table_of(path: &Path, ids: &[ChunkId], max: u64) -> std::io::Result<()> {
        write_table(
            path,
            [7; 16],
            [8; 32],
            &[],
            &[PackId([1; 16])],
            ids.iter().map(|id| Ok(encode_entry(0, &entry(*id, 0)))),
            max,
        )
    }

    /// Lookups start at an id's share of the table and gallop outwards: they find every id
    /// and no other, whether ids are spread evenly (keyed hashes) or bunched up (here 3/4 of
    /// them under one prefix byte and the rest at the top), where the first guess is far off.
    #[test]
    fn lookups_find_every_id_however_the_ids_are_spread() {
        let dir = tempfile::tempdir().unwrap();
        let hash = |i: u32| *blake3::hash(&i.to_le_bytes()).as_bytes();
        let bunched = |i: u32| {
            let mut id = hash(i);
            let top = i.is_multiple_of(4);
            id[0] = if top { 0xff } else { 0 };
            id[1] = if top { 0xff } else { id[1] % 3 };
            id
        };
        for (name, make) in [
            ("even", &hash as &dyn Fn(u32) -> [u8; 32]),
            ("bunched", &bunched),
        ] {
            let path = dir.path().join(format!("{name}.tbl"));
            let mut ids: Vec<ChunkId> = (0..20_000).map(|i| ChunkId(make(i))).collect();
            ids.sort();
            table_of(&path, &ids, ids.len() as u64).unwrap();
            let t = Table::open(&path).unwrap();
            for (i, id) in ids.iter().enumerate() {
                assert_eq!(t.position(id), Some(i), "{name}: id {i}");
            }
            for i in 20_000..40_000 {
                let absent = ChunkId(make(i));
                assert_eq!(t.position(&absent), None, "{name}: absent {i}");
            }
            assert!(!t.is_damaged());
        }
    }

    /// A filter of several check groups (the last one shorter) is written front to back,
    /// passes its checks, holds every id and few others; entries out of order are refused.
    #[test]
    fn filters_of_many_groups_are_written_in_id_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.tbl");
        let id = |i: u32| ChunkId(*blake3::hash(&i.to_le_bytes()).as_bytes());
        let mut ids: Vec<ChunkId> = (0..250_000).map(id).collect();
        ids.sort();
        let blocks = blocks_for(ids.len() as u64);
        assert!(blocks > 4 * FILTER_UNIT && !blocks.is_multiple_of(FILTER_UNIT));
        let write = |ids: &[ChunkId]| table_of(&path, ids, 250_000);
        write(&ids).unwrap();
        let t = Table::open(&path).unwrap();
        assert!(t.check_all() && !t.is_damaged());
        assert!(ids.iter().all(|id| t.may_contain(id)));
        let false_positives = (250_000..260_000)
            .filter(|&i| t.may_contain(&id(i)))
            .count();
        assert!(false_positives < 400, "{false_positives} of 10000 pass");
        drop(t);
        ids.swap(10, 200_000);
        let e = write(&ids).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
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
                .map(|(i, id)| Ok(encode_entry((i % 2) as u32, &entry(*id, 16 + i as u64)))),
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
            let mut cursor = t.cursor();
            let got: Vec<_> = batch
                .iter()
                .enumerate()
                .map(|(i, id)| (i, cursor.seek(id)))
                .collect();
            let want: Vec<_> = batch
                .iter()
                .enumerate()
                .map(|(i, id)| (i, t.position(id)))
                .collect();
            assert_eq!(got, want, "stride {stride}");
        }
        assert!(t.check_all() && !t.is_damaged());
        drop(t);
        let bytes = std::fs::read(&path).unwrap();
        let len = bytes.len();
        // The header and the directory are checked when the table is opened; the entries and
        // the filter when a lookup touches them (or all at once).
        let entries_at = TABLE_HEADER_LEN + 32 + 2 * 16;
        let filter_at = entries_at + 5000 * TABLE_ENTRY_LEN;
        for at in [
            0,
            50,
            TABLE_HEADER_LEN + 3,
            entries_at + 7,
            len / 2,
            filter_at + 100,
            len - 1,
        ] {
            let mut bad = bytes.clone();
            bad[at] ^= 1;
            std::fs::write(&path, &bad).unwrap();
            match Table::open(&path) {
                Err(_) => assert!(at < entries_at || at >= len - 32 * 6, "flip at {at}"),
                Ok(t) => {
                    assert!(!t.check_all(), "flip at {at}");
                    assert!(t.is_damaged());
                    assert!(!path.exists(), "a damaged table is removed");
                }
            }
        }
        std::fs::write(&path, &bytes[..len - 1]).unwrap();
        assert!(Table::open(&path).is_err());
        // A damaged entry block: lookups in it find nothing (the chunk is stored again, never
        // skipped); the other blocks still answer.
        let mut bad = bytes.clone();
        bad[entries_at + 10 * TABLE_ENTRY_LEN] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let t = Table::open(&path).unwrap();
        assert!(t.get(&ids[4999]).is_some());
        assert!(!t.is_damaged());
        assert!(t.get(&ids[10]).is_none());
        assert!(t.is_damaged());
    }
}
