//! The index (through the local cache), the index files behind it, and prune's marks as
//! backups honour them.

use std::collections::{BTreeSet, HashSet};

use crate::backend::Kind;
use crate::crypto::SealedFor;
use crate::error::{DecodeError, Result, StoreError};
use crate::id::{random_bytes, to_hex, ChunkId, IndexId, PackId};
use crate::index::file::IndexFile;
use crate::index::{read_index_file, CacheLocation, Index, IndexEntry, IndexReport};
use crate::marks::Marks;
use crate::pack::PackEntry;

use super::Repository;

/// The marked packs as this process knows them.
#[derive(Debug, Default)]
pub(super) struct Marked {
    packs: HashSet<PackId>,
    /// A marks object that could not be read: which packs it marks is unknown.
    damaged: Option<String>,
}

/// A marks object as listed.
#[derive(Debug)]
pub struct FoundMarks {
    /// Its name.
    pub name: String,
    /// When the storage wrote it (its clock, seconds since the Unix epoch).
    pub modified: i64,
    /// Its contents, or why they could not be read.
    pub marks: Result<Marks>,
}

impl Repository {
    /// Loads the index through the cache at `cache`, bringing it up to date with the index
    /// files. Call it after taking the lock: the cache is written here.
    pub fn load_index(&self, cache: &CacheLocation) -> Result<IndexReport> {
        if self.index.get().is_some() {
            return self.refresh_index();
        }
        // The marks before the index files (see `load_marks`).
        self.load_marks()?;
        let (index, report) = Index::open(
            self.b()?,
            cache,
            self.config.repo_id,
            self.config_hash,
            self.crypto.clone(),
        )?;
        let _ = self.index.set(index);
        Ok(report)
    }

    /// Brings the loaded index up to date with index files written since it was loaded.
    pub fn refresh_index(&self) -> Result<IndexReport> {
        self.load_marks()?;
        self.index()?.refresh(self.b()?)
    }

    /// The index (see [`Repository::load_index`]).
    pub fn index(&self) -> Result<&Index> {
        self.index.get().ok_or(StoreError::IndexNotLoaded)
    }

    /// Looks a blob up in the index, failing when it is not there.
    pub fn locate(&self, id: &ChunkId) -> Result<IndexEntry> {
        self.index()?.get(id).ok_or(StoreError::BlobMissing(*id))
    }

    /// A frozen numbering of the indexed blobs ([`Index::rows`]); a cache table found damaged
    /// on the way is rebuilt from the index files first.
    pub fn index_rows(&self) -> Result<crate::Rows> {
        for _ in 0..2 {
            if let Some(rows) = self.index()?.rows() {
                return Ok(rows);
            }
            self.refresh_index()?;
        }
        Err(StoreError::Corrupt {
            path: self.index()?.cache_dir().to_owned(),
            what: "index cache table",
            source: crate::error::DecodeError::ChecksumMismatch {
                got: "a damaged block twice".into(),
                expected: "a sound table".into(),
            },
        })
    }

    /// Reads which packs prune has marked, adding them to those already known (a pack once
    /// marked stays avoided for the life of the process: a mark acted on since is no reason to
    /// dedup against what it named). After the lock is taken, and *before* the index files are
    /// listed: a mark this process reads is honoured; a prune that marks packs after our lock
    /// waits for it to go before it deletes them; and a mark acted on (and removed) before this
    /// listing had its packs dropped from the index files first, so the index files listed next
    /// do not name them.
    fn load_marks(&self) -> Result<()> {
        let found = self.list_marks()?;
        let mut marked = self.marked.write().expect("no thread panics holding this");
        marked.damaged = None;
        for f in found {
            match f.marks {
                Ok(m) => marked.packs.extend(m.packs.into_iter().map(|(p, _)| p)),
                Err(e) => marked.damaged = Some(e.to_string()),
            }
        }
        Ok(())
    }

    /// Whether a new snapshot may refer to blob `id` without storing it again: the index knows
    /// it, in a pack no prune has marked for deletion (a backup never dedups against a marked
    /// pack: a later prune may delete it, docs/design.md, "prune"). Fails when a marks object
    /// could not be read, since any pack might be marked.
    pub fn dedup_hit(&self, id: &ChunkId) -> Result<bool> {
        let Some(e) = self.index()?.get(id) else {
            return Ok(false);
        };
        let marked = self.marked.read().expect("no thread panics holding this");
        if let Some(why) = &marked.damaged {
            return Err(StoreError::Corrupt {
                path: Kind::Marks.dir().into(),
                what: "marks object",
                source: DecodeError::Invalid {
                    field: "marks",
                    detail: format!("{why}; run `sbk prune --exclusive` to clear it"),
                },
            });
        }
        if marked.packs.contains(&e.pack) {
            return Ok(false);
        }
        if self.config.object_lock.is_some() {
            // The new snapshot will need this pack: under Object Lock its retention must
            // cover the snapshot's protection (engine, protect.rs).
            self.reused_packs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(e.pack)
                .or_insert(0);
        }
        Ok(true)
    }

    /// The packs dedup hits found blobs in (recorded only under Object Lock) that this process
    /// has not extended to `needed` or later.
    pub fn reused_packs_below(&self, needed: i64) -> Vec<PackId> {
        let reused = self.reused_packs.lock().unwrap_or_else(|e| e.into_inner());
        let mut below: Vec<PackId> = reused
            .iter()
            .filter(|(_, until)| **until < needed)
            .map(|(p, _)| *p)
            .collect();
        below.sort();
        below
    }

    /// Records that `packs` are retained until `until`.
    pub fn packs_extended(&self, packs: &[PackId], until: i64) {
        let mut reused = self.reused_packs.lock().unwrap_or_else(|e| e.into_inner());
        for p in packs {
            let known = reused.entry(*p).or_insert(0);
            *known = (*known).max(until);
        }
    }

    /// Whether `pack` was marked for deletion by a prune when the index was last loaded.
    pub fn is_marked(&self, pack: &PackId) -> bool {
        self.marked
            .read()
            .expect("no thread panics holding this")
            .packs
            .contains(pack)
    }

    /// Every marks object, with when the storage wrote it.
    pub fn list_marks(&self) -> Result<Vec<FoundMarks>> {
        let mut out = Vec::new();
        for o in self.b()?.list(Kind::Marks)? {
            let marks = match self.b()?.read(Kind::Marks, &o.name) {
                Ok(bytes) => Marks::decode(&bytes).map_err(|source| StoreError::Corrupt {
                    path: Kind::Marks.object_path(&o.name),
                    what: "marks object",
                    source,
                }),
                Err(StoreError::ObjectMissing { .. }) => continue, // acted on meanwhile
                Err(e) => return Err(e),
            };
            out.push(FoundMarks {
                name: o.name,
                modified: o.modified,
                marks,
            });
        }
        Ok(out)
    }

    /// Writes a marks object (durable before this returns); returns its name.
    pub fn write_marks(&self, marks: &Marks) -> Result<String> {
        let name = to_hex(&random_bytes::<16>().map_err(|e| StoreError::io(self.location(), e))?);
        self.b()?.write_once(Kind::Marks, &name, &marks.encode())?;
        Ok(name)
    }

    /// Removes a marks object (a durable delete).
    pub fn remove_marks(&self, name: &str) -> Result<()> {
        match self.b()?.delete(Kind::Marks, name) {
            Ok(()) | Err(StoreError::ObjectMissing { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Writes an index file naming `packs` (which must be durable already) and adds it to the
    /// loaded index. Returns its id.
    pub fn write_index_file(&self, packs: Vec<(PackId, Vec<PackEntry>)>) -> Result<IndexId> {
        let (id, file) = self.store_index_file(packs)?;
        if let Some(index) = self.index.get() {
            index.add(id, file);
        }
        Ok(id)
    }

    /// Writes an index file that replaces others (prune and repair rewriting the index), and
    /// leaves the loaded index alone: adding a file means looking each of its entries up in
    /// the cache table, a page fault each when the table is larger than memory (an hour for a
    /// prune at 10^7 chunks in 256 MiB), and once the files it replaces are removed the loaded
    /// index is stale anyway: the next refresh (a lookup that misses, or the next process)
    /// rebuilds it from the files that remain. Returns its id.
    pub fn write_replacement_index_file(
        &self,
        packs: Vec<(PackId, Vec<PackEntry>)>,
    ) -> Result<IndexId> {
        Ok(self.store_index_file(packs)?.0)
    }

    fn store_index_file(
        &self,
        packs: Vec<(PackId, Vec<PackEntry>)>,
    ) -> Result<(IndexId, IndexFile)> {
        let file = IndexFile {
            packs,
            extensions: Vec::new(),
        };
        let bytes = self
            .crypto
            .seal(SealedFor::Object(Kind::Index), &file.encode())
            .map_err(|e| StoreError::io("index file", e))?;
        let id = IndexFile::id_of(&bytes);
        self.b()?.write_once(Kind::Index, &id.to_hex(), &bytes)?;
        Ok((id, file))
    }

    /// Every index file in the repository.
    pub fn index_files(&self) -> Result<BTreeSet<IndexId>> {
        crate::backend::list_ids(self.b()?, Kind::Index)
    }

    /// Reads one index file.
    pub fn read_index_file(&self, id: &IndexId) -> Result<IndexFile> {
        read_index_file(self.b()?, id, &self.crypto)
    }

    /// Removes an index file (prune and repair, under an exclusive lock, once the index files
    /// that replace it are written).
    pub fn remove_index_file(&self, id: &IndexId) -> Result<()> {
        self.b()?.delete(Kind::Index, &id.to_hex())
    }
}
