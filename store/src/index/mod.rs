//! Locating blobs: the index files in the repository, and the local cache in front of them.
//!
//! The repository's index files ([`IndexFile`]) say which blob is in which pack. Reading all of
//! them for every lookup would be slow and reading them into memory unbounded, so each process
//! looks blobs up in a cache: an immutable, memory-mapped [`table`] merged from the index files
//! it has seen, plus a small in-memory overlay of the ones that appeared since (folded into a new
//! table once it grows). The cache lives outside the repository and is never needed for
//! correctness: it is checked against the repository's set of index files on every open, and
//! one that is missing, damaged or stale is rebuilt from the index files with a notice.

pub mod file;
mod filter;
mod fold;
mod gather;
pub mod lookups;
pub mod rows;
mod spill;
pub mod table;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::backend::{Backend, Kind};
use crate::crypto::Crypto;
use crate::error::DecodeError;
use crate::error::{Result, StoreError};
use crate::id::{ChunkId, IndexId, PackId};
use crate::pack::PackEntry;
use file::IndexFile;
use fold::damaged_table;
use gather::Gathered;
use rows::Rows;
use table::{Table, TableError, TABLE_VERSION};

/// Where a blob lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// The pack holding it.
    pub pack: PackId,
    /// The blob as the pack trailer lists it.
    pub entry: PackEntry,
}

impl IndexEntry {
    /// Every entry an index file names.
    fn of_file(file: IndexFile) -> Vec<IndexEntry> {
        file.packs
            .into_iter()
            .flat_map(|(pack, entries)| {
                entries
                    .into_iter()
                    .map(move |entry| IndexEntry { pack, entry })
            })
            .collect()
    }
}

/// Where the index cache is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheLocation {
    /// In this directory (one folder per repository id inside it, mode 0700).
    Dir(PathBuf),
    /// In a temporary directory removed when the process ends (`--no-cache`).
    Temporary,
}

/// The overlay is folded into a new table once it holds this many entries (about 5 MiB of
/// memory, one fold per 16 GiB of new data at 256 KiB chunks), or a quarter of the tables',
/// whichever is more: rebuilding a large cache from scratch then rewrites each entry about five
/// times, not once per fold. (Unit tests use smaller values here and in [`OVERLAY_MAX`], so
/// that a few thousand entries fold, into a base or a delta.)
const FOLD_AT: usize = if cfg!(test) { 1 << 11 } else { 1 << 16 };
/// ... but never more than this (about 20 MiB of hash map): above it the overlay would grow
/// with the repository.
const OVERLAY_MAX: usize = if cfg!(test) { 1 << 12 } else { 1 << 17 };
/// A temporary file in the cache folder that nobody has written for this long is a leftover of
/// a killed process.
const LEFTOVER_AGE: std::time::Duration = std::time::Duration::from_secs(3600);
/// A refresh keeps the entries of the index files it reads in memory up to this many (about 40
/// MiB), and past it spills them to scratch files by id prefix, in partitions of about this
/// many entries each ([`gather`]): memory stays bounded however many index files there are.
/// (Unit tests use small runs, so that they spill and split partitions.)
const RUN_ENTRIES: usize = if cfg!(test) { 1 << 12 } else { 1 << 19 };

/// A rebuild asks for this many index files ahead of the one it reads.
const READ_AHEAD: usize = 4;

/// A fold writes a new delta table rather than a new base while the delta would hold at most
/// this fraction of the base's entries: at 10^8 entries, one rewrite of the 5.7 GB base per
/// 6 x 10^6 new entries instead of one per 2^17.
const DELTA_RATIO: usize = 16;

impl State {
    /// Entries in the tables.
    fn tables_len(&self) -> usize {
        self.tables.iter().map(|t| t.len()).sum()
    }

    /// Looks a blob up in the tables (the delta first: smaller, and more recent).
    fn in_tables(&self, id: &ChunkId) -> Option<IndexEntry> {
        self.tables.iter().rev().find_map(|t| t.get(id))
    }

    /// Forgets the tables and the overlay: everything is read again.
    fn clear(&mut self) {
        self.tables.clear();
        self.table_files.clear();
        self.overlay.clear();
        self.overlay_files.clear();
    }
}

/// Whether the overlay with `more` entries is due for a fold.
fn fold_due_with(st: &State, more: usize) -> bool {
    let at = FOLD_AT.max(st.tables_len() / 4);
    !st.fold_failed && st.overlay.len() + more >= at.min(OVERLAY_MAX)
}

struct State {
    /// The tables in use, shared with the [`Rows`] views taken of them: the base, and maybe a
    /// delta of index files that appeared since, which a fold rewrites instead of the base
    /// while it holds less than 1/[`DELTA_RATIO`] of the base's entries. No id is in both.
    tables: Vec<Arc<Table>>,
    /// The index files the tables merged.
    table_files: HashSet<IndexId>,
    overlay: HashMap<ChunkId, IndexEntry>,
    overlay_files: HashSet<IndexId>,
    /// Set when a table could not be written (a full or read-only cache disk): the overlay then
    /// simply grows for the rest of the run rather than failing a command over a cache.
    fold_failed: bool,
}

/// The index of a repository as this process sees it: lookups by blob id.
pub struct Index {
    dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    repo_id: [u8; 16],
    config_hash: [u8; 32],
    crypto: Arc<Crypto>,
    state: RwLock<State>,
}

/// What bringing the index up to date with the repository found; each item is one notice.
#[derive(Debug, Clone, Default)]
pub struct IndexReport {
    /// Things the operator should know (a cache rebuilt, and why).
    pub notices: Vec<String>,
    /// Index files that could not be read, with the reason.
    pub damaged: Vec<(IndexId, String)>,
    /// Index files read from the repository.
    pub files_read: usize,
}

pub(crate) fn make_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

fn table_name(files: &BTreeSet<IndexId>) -> String {
    let mut h = blake3::Hasher::new();
    // The version first: an sbk of another version sharing the cache never replaces this
    // process's table under its name, nor this one its.
    h.update(&TABLE_VERSION.to_le_bytes());
    for f in files {
        h.update(&f.0);
    }
    format!("{}.tbl", &h.finalize().to_hex()[..32])
}

impl Index {
    /// Opens the cache for a repository and brings it up to date with the repository's index
    /// files.
    pub(crate) fn open(
        backend: &dyn Backend,
        location: &CacheLocation,
        repo_id: [u8; 16],
        config_hash: [u8; 32],
        crypto: Arc<Crypto>,
    ) -> Result<(Index, IndexReport)> {
        let mut report = IndexReport::default();
        let temp = || {
            tempfile::Builder::new()
                .prefix("sbk-cache-")
                .tempdir()
                .map_err(|e| StoreError::io(std::env::temp_dir(), e))
        };
        let (dir, temp_dir) = match location {
            CacheLocation::Dir(base) => {
                let dir = base.join(crate::id::to_hex(&repo_id));
                match make_private_dir(&dir) {
                    Ok(()) => (dir, None),
                    Err(e) => {
                        report.notices.push(format!(
                            "index cache: cannot use {}: {e}; using a temporary cache for this run",
                            dir.display()
                        ));
                        let t = temp()?;
                        (t.path().to_owned(), Some(t))
                    }
                }
            }
            CacheLocation::Temporary => {
                let t = temp()?;
                (t.path().to_owned(), Some(t))
            }
        };
        let index = Index {
            dir,
            _temp: temp_dir,
            repo_id,
            config_hash,
            crypto,
            state: RwLock::new(State {
                tables: Vec::new(),
                table_files: HashSet::new(),
                overlay: HashMap::new(),
                overlay_files: HashSet::new(),
                fold_failed: false,
            }),
        };
        let current = Self::current_files(backend)?;
        index.pick_table(&current, &mut report);
        if index.sync_with(backend, current, &mut report)? {
            index.sync(backend, &mut report)?;
        }
        Ok((index, report))
    }

    fn current_files(backend: &dyn Backend) -> Result<BTreeSet<IndexId>> {
        crate::backend::list_ids(backend, Kind::Index)
    }

    /// The tables in the cache folder.
    fn tables(&self) -> Vec<PathBuf> {
        std::fs::read_dir(&self.dir)
            .map(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "tbl"))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Removes what processes killed while writing a table or a run left in the cache folder
    /// (`.*.tmp`: at 10^8 blobs a table is 5.7 GB). Only files nobody has written for
    /// [`LEFTOVER_AGE`]: a writer writes its file front to back without a pause, and other
    /// processes may be writing theirs right now. Best effort, like the cache itself.
    fn remove_leftovers(&self) {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let now = std::time::SystemTime::now();
        for entry in dir.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if !(name.starts_with('.') && name.ends_with(".tmp")) {
                continue;
            }
            let idle = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok());
            if idle.is_some_and(|d| d >= LEFTOVER_AGE) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Chooses the best usable tables: built for this repository and config, from index files
    /// that all still exist, intact; the base is the one of the most index files, the delta
    /// the one of the most among those that share none with the base (a delta is written
    /// without the ids its base holds: [`Index::fold`]). Damaged and stale tables are removed.
    fn pick_table(&self, current: &BTreeSet<IndexId>, report: &mut IndexReport) {
        self.remove_leftovers();
        let mut candidates = Vec::new();
        let mut stale = 0;
        for path in self.tables() {
            match Table::peek(&path) {
                Ok((h, files))
                    if h.repo_id == self.repo_id && h.config_hash == self.config_hash =>
                {
                    if files.iter().all(|f| current.contains(f)) {
                        candidates.push((files, path));
                    } else {
                        stale += 1;
                        let _ = std::fs::remove_file(&path);
                    }
                }
                Ok(_) => {
                    stale += 1;
                    let _ = std::fs::remove_file(&path);
                }
                // A table of a newer sbk sharing this cache is left to it; an older one is
                // replaced, as the format it was built in is no longer read.
                Err(TableError::Bad(DecodeError::UnsupportedVersion(v))) if v > TABLE_VERSION => {}
                Err(TableError::Bad(DecodeError::UnsupportedVersion(v))) => {
                    report.notices.push(format!(
                        "index cache: {} was built by an older sbk (table version {v}); rebuilding it",
                        path.display()
                    ));
                    let _ = std::fs::remove_file(&path);
                }
                Err(TableError::Bad(e)) => {
                    report.notices.push(format!(
                        "index cache: {} is damaged ({e}); rebuilding it from the repository's index files",
                        path.display()
                    ));
                    let _ = std::fs::remove_file(&path);
                }
                Err(TableError::Io(e)) => report.notices.push(format!(
                    "index cache: {} cannot be read ({e}); not using it",
                    path.display()
                )),
            }
        }
        if stale > 0 && candidates.is_empty() {
            report.notices.push(
                "index cache: stale (index files it was built from are gone: prune or repair ran, here or on another host, or the repository was restored from an older copy); rebuilding it".into(),
            );
        }
        candidates.sort_by_key(|c| std::cmp::Reverse(c.0.len()));
        let mut st = self.state.write().expect("no thread panics holding this");
        for (files, path) in candidates {
            if st.tables.len() == 2
                || (!st.tables.is_empty()
                    && (files.is_empty() || files.iter().any(|f| st.table_files.contains(f))))
            {
                continue;
            }
            match Table::open(&path) {
                Ok(t) => {
                    st.table_files.extend(files);
                    st.tables.push(Arc::new(t));
                }
                Err(e) => {
                    report.notices.push(format!(
                        "index cache: {} is damaged ({e}); rebuilding it from the repository's index files",
                        path.display()
                    ));
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }

    /// Brings the index up to date with the repository: index files that appeared are read;
    /// if any the cache knows has gone (prune ran), the cache is rebuilt from scratch, so no
    /// lookup can name a pack that prune removed.
    pub fn refresh(&self, backend: &dyn Backend) -> Result<IndexReport> {
        let mut report = IndexReport::default();
        self.sync(backend, &mut report)?;
        Ok(report)
    }

    /// Lists the index files and reads the new ones, again while a listed file vanishes before
    /// it is read: a prune replaced it, and wrote its replacement (unlisted yet) first.
    fn sync(&self, backend: &dyn Backend, report: &mut IndexReport) -> Result<()> {
        for _ in 0..5 {
            let current = Self::current_files(backend)?;
            if !self.sync_with(backend, current, report)? {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Brings the index to the files `current`; true when one of them vanished before it was
    /// read (list again).
    fn sync_with(
        &self,
        backend: &dyn Backend,
        current: BTreeSet<IndexId>,
        report: &mut IndexReport,
    ) -> Result<bool> {
        let mut st = self.state.write().expect("no thread panics holding this");
        let gone = st
            .table_files
            .iter()
            .chain(&st.overlay_files)
            .any(|f| !current.contains(f));
        let damaged = st.tables.iter().any(|t| t.is_damaged());
        if damaged {
            report.notices.push(
                "index cache: a block of the table failed its check (the table was removed); rebuilding it from the repository's index files".into(),
            );
        } else if gone {
            report.notices.push(
                "index cache: index files were removed while this process ran (prune or repair); rebuilding it".into(),
            );
        }
        if gone || damaged {
            st.clear();
        }
        let new: Vec<IndexId> = current
            .iter()
            .filter(|f| !st.table_files.contains(f) && !st.overlay_files.contains(f))
            .copied()
            .collect();
        let mut vanished = false;
        // Set when entries gathered were lost (a scratch file that could not be read back):
        // their files are read again, into the overlay this time.
        let mut again = false;
        let mut gathered = Gathered::default();
        let expected = new.len();
        // Index files are read, checked against their names and decoded on a thread of their
        // own, two files ahead of their gathering (and asked for READ_AHEAD ahead): at 10^8 entries that is half of a rebuild's first pass
        // over 6,107 files, beside the other half (spilling their entries).
        let crypto = &self.crypto;
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::sync_channel(2);
            std::thread::Builder::new()
                .name("sbk-index-read".into())
                .spawn_scoped(scope, move || {
                    // A few files ahead are asked for as each is read: reads of the next ones
                    // overlap this one's hashing and decoding.
                    let hint = |i: usize| {
                        if let Some(id) = new.get(i) {
                            backend.will_read(Kind::Index, &id.to_hex());
                        }
                    };
                    (0..READ_AHEAD).for_each(hint);
                    for (i, id) in new.iter().enumerate() {
                        hint(i + READ_AHEAD);
                        if tx
                            .send((*id, read_index_file(backend, id, crypto)))
                            .is_err()
                        {
                            break;
                        }
                    }
                })
                .map_err(|e| StoreError::io(&self.dir, e))?;
            for (id, read) in rx {
                match read {
                    Ok(file) => {
                        report.files_read += 1;
                        if st.fold_failed {
                            Self::add_locked(&mut st, id, &file);
                            continue;
                        }
                        if let Err(e) = gathered.add(&self.dir, id, file, expected) {
                            self.fold_failed(&mut st, report, &StoreError::io(&self.dir, e));
                            again |= !std::mem::take(&mut gathered).into_overlay(&mut st);
                        }
                    }
                    Err(e) if e.is_corrupt() => {
                        report.damaged.push((id, e.to_string()));
                    }
                    Err(StoreError::ObjectMissing { .. }) => vanished = true,
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })?;
        let first = st.tables.is_empty() && !st.overlay.is_empty();
        if gathered.is_spilled()
            || fold_due_with(&st, gathered.entries.len())
            || (first && !st.fold_failed)
            || (st.tables.is_empty() && !gathered.entries.is_empty())
        {
            if let Err(e) = self.fold_gathered(&mut st, &mut gathered) {
                if damaged_table(&e) {
                    // The table was dropped: list and read everything again.
                    report
                        .notices
                        .push(format!("index cache: {e}; rebuilding it"));
                    return Ok(true);
                }
                self.fold_failed(&mut st, report, &e);
                again |= !gathered.into_overlay(&mut st);
            }
        } else {
            again |= !gathered.into_overlay(&mut st);
        }
        Ok(vanished || again)
    }

    /// After a fold failed: says so, and goes on with the overlay (a cache never stands in the
    /// way).
    fn fold_failed(&self, st: &mut State, report: &mut IndexReport, e: &StoreError) {
        st.fold_failed = true;
        report.notices.push(format!(
            "index cache: cannot write a table in {}: {e}; going on with the index in memory",
            self.dir.display()
        ));
    }

    fn add_locked(st: &mut State, id: IndexId, file: &IndexFile) {
        let entries = file.packs.iter().flat_map(|(pack, entries)| {
            entries.iter().map(|e| IndexEntry {
                pack: *pack,
                entry: *e,
            })
        });
        Self::add_entries(st, id, entries);
    }

    fn add_entries(st: &mut State, id: IndexId, entries: impl IntoIterator<Item = IndexEntry>) {
        Self::add_entries_only(st, entries);
        st.overlay_files.insert(id);
    }

    /// Adds entries to the overlay, without looking them up in the tables first: a blob the
    /// tables hold too is stored twice (two writers at once, or a prune that moved it), and
    /// either copy is as good. Lookups find the overlay's, rows number both, a fold keeps the
    /// table's, and [`Index::len`] counts both until then. Looking each entry up was a
    /// random read of the table's filter per entry: at 10^8 entries under a memory limit, each
    /// process that opened the repository paid a page fault for most entries of the index
    /// files written since the last fold (up to 2^17), seconds before its first read.
    fn add_entries_only(st: &mut State, entries: impl IntoIterator<Item = IndexEntry>) {
        for e in entries {
            st.overlay.entry(e.entry.id).or_insert(e);
        }
    }

    /// Adds an index file this process has just written to the repository.
    pub(crate) fn add(&self, id: IndexId, file: IndexFile) {
        let mut st = self.state.write().expect("no thread panics holding this");
        // A failure was already reported as a notice where the index was loaded, or is not
        // worth failing a backup over: the overlay keeps the entries.
        let mut ignored = IndexReport::default();
        self.add_file(&mut st, id, file, &mut ignored);
    }

    /// Adds an index file's entries: straight into a new table, sorted, when that is due
    /// anyway (without passing through the overlay's hash map, which costs several times its
    /// entries' size: prune and repair write files of 2^17 entries), else into the overlay.
    ///
    /// Into the overlay without looking them up in the tables ([`Index::add_entries_only`]):
    /// this process looked each of these blobs up before it wrote it, and at 10^8 entries under
    /// a memory limit that second lookup was most of a backup's page faults.
    fn add_file(&self, st: &mut State, id: IndexId, file: IndexFile, report: &mut IndexReport) {
        let entries: usize = file.packs.iter().map(|(_, e)| e.len()).sum();
        if !fold_due_with(st, entries) {
            Self::add_locked(st, id, &file);
            return;
        }
        let mut incoming = IndexEntry::of_file(file);
        incoming.sort_by_key(|e| e.entry.id);
        if let Err(e) = self.fold(st, &[id], &incoming, None) {
            if damaged_table(&e) {
                report
                    .notices
                    .push(format!("index cache: {e}; rebuilding it"));
            } else {
                self.fold_failed(st, report, &e);
            }
            Self::add_entries(st, id, incoming);
        }
    }

    /// Looks up a blob.
    pub fn get(&self, id: &ChunkId) -> Option<IndexEntry> {
        let st = self.state.read().expect("no thread panics holding this");
        st.overlay.get(id).copied().or_else(|| st.in_tables(id))
    }

    /// Looks up `ids`, which must be sorted: `f(i, entry)` for each in turn. The table is read
    /// front to back once ([`Table::cursor`]) instead of binary-searched from the top
    /// for each id: a restore of millions of chunks from a table larger than memory reads it
    /// once rather than faulting pages in at random.
    pub fn get_sorted(&self, ids: &[ChunkId], mut f: impl FnMut(usize, Option<IndexEntry>)) {
        let st = self.state.read().expect("no thread panics holding this");
        let mut cursors: Vec<_> = st.tables.iter().rev().map(|t| (t, t.cursor())).collect();
        for (i, id) in ids.iter().enumerate() {
            let e = st.overlay.get(id).copied().or_else(|| {
                cursors
                    .iter_mut()
                    .find_map(|(t, c)| c.seek(id).and_then(|p| t.entry_at(p)))
            });
            f(i, e);
        }
    }

    /// Asks the kernel ahead for what looking `ids` up will read from the table (advice only;
    /// see [`Table::prefetch`]): look them up a moment later, and the reads have overlapped
    /// whatever came between.
    pub fn prefetch(&self, ids: &[ChunkId]) {
        let st = self.state.read().expect("no thread panics holding this");
        for t in &st.tables {
            ids.iter().for_each(|id| t.prefetch(id));
        }
    }

    /// True when the blob is indexed.
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.get(id).is_some()
    }

    /// The index files this index was built from.
    pub fn files(&self) -> BTreeSet<IndexId> {
        let st = self.state.read().expect("no thread panics holding this");
        st.table_files
            .iter()
            .chain(&st.overlay_files)
            .copied()
            .collect()
    }

    /// Calls `f` with every entry (one per blob id).
    pub fn for_each(&self, mut f: impl FnMut(IndexEntry)) {
        let st = self.state.read().expect("no thread panics holding this");
        st.overlay.values().copied().for_each(&mut f);
        for t in &st.tables {
            t.iter()
                .filter(|e| !st.overlay.contains_key(&e.entry.id))
                .for_each(&mut f);
        }
    }

    /// Number of index entries: indexed blobs, plus those stored twice whose second copy is
    /// in the overlay (until a fold).
    pub fn len(&self) -> usize {
        let st = self.state.read().expect("no thread panics holding this");
        st.overlay.len() + st.tables_len()
    }

    /// True when nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A frozen numbering of the indexed blobs, for facts kept per blob in dense arrays. The
    /// table is checked in full first (whole-repository passes must not take a damaged block
    /// for missing blobs): `None` when it is damaged, and the next refresh rebuilds it
    /// ([`Repository::index_rows`](crate::Repository::index_rows) does both).
    pub fn rows(&self) -> Option<Rows> {
        let st = self.state.read().expect("no thread panics holding this");
        if st.tables.iter().any(|t| !t.check_all()) {
            return None;
        }
        Some(Rows::new(
            st.tables.clone(),
            st.overlay.values().copied().collect(),
        ))
    }

    /// The folder holding this repository's cache.
    pub fn cache_dir(&self) -> &Path {
        &self.dir
    }
}

/// Reads, opens and decodes one index file, checking that its bytes still hash to its name.
pub(crate) fn read_index_file(
    backend: &dyn Backend,
    id: &IndexId,
    crypto: &Crypto,
) -> Result<IndexFile> {
    let name = id.to_hex();
    let bytes = backend.read(Kind::Index, &name)?;
    let corrupt = |source| StoreError::Corrupt {
        path: PathBuf::from(format!("index/{name}")),
        what: "index file",
        source,
    };
    let got = IndexFile::id_of(&bytes);
    if got != *id {
        return Err(corrupt(crate::error::DecodeError::ChecksumMismatch {
            got: got.to_hex(),
            expected: name.clone(),
        }));
    }
    let plain = crypto
        .open(crate::crypto::SealedFor::Object(Kind::Index), &bytes)
        .map_err(corrupt)?;
    IndexFile::decode(&plain).map_err(corrupt)
}
