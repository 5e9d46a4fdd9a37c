//! The index: chunk id -> where the blob lives. A sled database used as a cache; the packs are
//! the truth, and [`crate::Repository::rebuild_index`] recreates it from their trailers.

use std::path::{Path, PathBuf};

use crate::blob::{BlobKind, Compression};
use crate::codec::{invalid, Decoder, Encoder};
use crate::error::{DecodeError, Result, StoreError};
use crate::id::{ChunkId, PackId};
use crate::pack::PackEntry;

/// Version byte at the start of every index value.
pub const INDEX_ENTRY_VERSION: u8 = 1;
/// Encoded size of an index value.
pub const INDEX_ENTRY_LEN: usize = 36;

/// Where a blob lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// The pack holding it.
    pub pack: PackId,
    /// The blob as the pack trailer lists it.
    pub entry: PackEntry,
}

impl IndexEntry {
    /// Encodes the value stored under the chunk id (docs/format.md, "index entry").
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        e.u8(INDEX_ENTRY_VERSION)
            .u8(self.entry.kind as u8)
            .u8(self.entry.compression as u8)
            .u8(0)
            .bytes(&self.pack.0)
            .u64(self.entry.offset)
            .u32(self.entry.stored_len)
            .u32(self.entry.raw_len);
        e.buf
    }

    /// Decodes a value stored under `id`.
    pub fn decode(id: ChunkId, bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Decoder::new(bytes);
        let version = d.u8()?;
        if version != INDEX_ENTRY_VERSION {
            return Err(DecodeError::UnsupportedVersion(version.into()));
        }
        let kind = BlobKind::from_u8(d.u8()?)?;
        let compression = Compression::from_u8(d.u8()?)?;
        crate::codec::reserved(d.u8()?.into(), "index entry reserved")?;
        let pack = PackId(d.array()?);
        let entry = PackEntry {
            id,
            kind,
            compression,
            offset: d.u64()?,
            stored_len: d.u32()?,
            raw_len: d.u32()?,
        };
        d.end("index entry")?;
        if entry.offset < crate::pack::PACK_HEADER_LEN {
            return Err(invalid("index offset", format!("{}", entry.offset)));
        }
        Ok(IndexEntry { pack, entry })
    }
}

/// The sled-backed index of a repository: one cache slot (see [`Index::open_slot`]).
pub struct Index {
    db: sled::Db,
    /// Pack id -> the ids of the blobs this slot indexed from it, so that a pack that goes away
    /// can be forgotten without scanning the whole index.
    packs: sled::Tree,
    path: PathBuf,
}

/// Most cache slots an index directory may hold (one per concurrent sbk process).
pub const MAX_SLOTS: usize = 16;

impl Index {
    /// Opens (or creates) the index database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        // sled caches 1 GiB by default; the index is looked up by random ids, so a large cache
        // buys little and would dominate the backup's memory.
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(8 << 20)
            .open()
            .map_err(|e| Self::error(path, e))?;
        let packs = db.open_tree("packs").map_err(|e| Self::error(path, e))?;
        Ok(Index {
            db,
            packs,
            path: path.to_owned(),
        })
    }

    /// Opens the first cache slot (`dir/0`, `dir/1`, …) that no other process holds. sled locks
    /// its database for one process; each concurrent sbk process gets a slot of its own, which
    /// [`crate::Repository::open`] brings up to date with the packs.
    pub fn open_slot(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
        for slot in 0..MAX_SLOTS {
            match Index::open(&dir.join(slot.to_string())) {
                Err(StoreError::Locked { .. }) => continue,
                other => return other,
            }
        }
        Err(StoreError::Locked {
            path: dir.to_owned(),
            holder: format!("all {MAX_SLOTS} index slots are in use by other sbk processes"),
        })
    }

    /// Every slot directory under `dir`.
    pub fn slots(dir: &Path) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for slot in 0..MAX_SLOTS {
            let p = dir.join(slot.to_string());
            if p.exists() {
                out.push(p);
            }
        }
        Ok(out)
    }

    /// The packs this slot has indexed.
    pub fn packs(&self) -> Result<std::collections::HashSet<PackId>> {
        self.packs
            .iter()
            .keys()
            .map(|k| {
                let k = k.map_err(|e| Self::error(&self.path, e))?;
                let id: [u8; 16] = k.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                    path: self.path.clone(),
                    what: "index pack record",
                    source: invalid("pack id", format!("{} bytes", k.len())),
                })?;
                Ok(PackId(id))
            })
            .collect()
    }

    /// Removes a pack from this slot: the entries that point into it, then its record. Returns
    /// the ids of the blobs the slot knew in it.
    pub fn forget_pack(&self, pack: PackId) -> Result<Vec<ChunkId>> {
        let Some(v) = self
            .packs
            .get(pack.0)
            .map_err(|e| Self::error(&self.path, e))?
        else {
            return Ok(Vec::new());
        };
        let ids: Vec<ChunkId> = v
            .chunks_exact(32)
            .map(|c| ChunkId(c.try_into().expect("chunks of 32")))
            .collect();
        let mut batch = sled::Batch::default();
        for id in &ids {
            // Another pack may hold the current copy of this blob: leave that entry alone.
            if self.get(id)?.is_some_and(|e| e.pack == pack) {
                batch.remove(&id.0);
            }
        }
        self.db
            .apply_batch(batch)
            .map_err(|e| Self::error(&self.path, e))?;
        self.packs
            .remove(pack.0)
            .map_err(|e| Self::error(&self.path, e))?;
        Ok(ids)
    }

    fn error(path: &Path, e: sled::Error) -> StoreError {
        match e {
            // sled holds an exclusive flock on its database while it is open; it reports a held
            // lock as an `Other` I/O error whose text says so (sled 0.34, config.rs).
            sled::Error::Io(io)
                if io.kind() == std::io::ErrorKind::WouldBlock
                    || io.to_string().contains("could not acquire lock") =>
            {
                StoreError::Locked {
                    path: path.to_owned(),
                    holder: "another sbk process has this index slot open".into(),
                }
            }
            sled::Error::Io(io) => StoreError::Io {
                path: path.to_owned(),
                source: io,
            },
            e => StoreError::Index {
                path: path.to_owned(),
                detail: e.to_string(),
            },
        }
    }

    /// Looks up a blob.
    pub fn get(&self, id: &ChunkId) -> Result<Option<IndexEntry>> {
        match self.db.get(id.0).map_err(|e| Self::error(&self.path, e))? {
            None => Ok(None),
            Some(v) => {
                IndexEntry::decode(*id, &v)
                    .map(Some)
                    .map_err(|source| StoreError::Corrupt {
                        path: self.path.clone(),
                        what: "index entry",
                        source,
                    })
            }
        }
    }

    /// True when the blob is indexed.
    pub fn contains(&self, id: &ChunkId) -> Result<bool> {
        self.db
            .contains_key(id.0)
            .map_err(|e| Self::error(&self.path, e))
    }

    /// Records a sealed pack, then adds its blobs in one atomic batch. sled recovers a prefix of
    /// its operations, so a crash leaves the record without the entries at worst: the pack's
    /// blobs are then simply unknown (a backup stores them again, prune sweeps the pack) and never
    /// entries without a record, which `forget_pack` could not find.
    pub fn insert_pack(&self, pack: PackId, entries: &[PackEntry]) -> Result<()> {
        let mut batch = sled::Batch::default();
        let mut known = self
            .packs
            .get(pack.0)
            .map_err(|e| Self::error(&self.path, e))?
            .map(|v| v.to_vec())
            .unwrap_or_default();
        for entry in entries {
            batch.insert(
                &entry.id.0,
                IndexEntry {
                    pack,
                    entry: *entry,
                }
                .encode(),
            );
            known.extend_from_slice(&entry.id.0);
        }
        self.packs
            .insert(pack.0, known)
            .map_err(|e| Self::error(&self.path, e))?;
        self.db
            .apply_batch(batch)
            .map_err(|e| Self::error(&self.path, e))?;
        Ok(())
    }

    /// Makes every insert so far durable. Called before a snapshot that relies on them is written.
    /// (`Db::flush` covers every tree of the database.)
    pub fn flush(&self) -> Result<()> {
        self.db
            .flush()
            .map(|_| ())
            .map_err(|e| Self::error(&self.path, e))
    }

    /// Removes blobs from the index (one atomic batch).
    pub fn remove(&self, ids: &[ChunkId]) -> Result<()> {
        let mut batch = sled::Batch::default();
        for id in ids {
            batch.remove(&id.0);
        }
        self.db
            .apply_batch(batch)
            .map_err(|e| Self::error(&self.path, e))
    }

    /// Removes every entry and pack record (before a rebuild from the packs).
    pub fn clear(&self) -> Result<()> {
        self.db.clear().map_err(|e| Self::error(&self.path, e))?;
        self.packs.clear().map_err(|e| Self::error(&self.path, e))
    }

    /// Every entry, in id order; an entry that does not decode is an error item.
    pub fn iter(&self) -> impl Iterator<Item = Result<IndexEntry>> + '_ {
        self.db.iter().map(move |kv| {
            let (k, v) = kv.map_err(|e| Self::error(&self.path, e))?;
            let corrupt = |source| StoreError::Corrupt {
                path: self.path.clone(),
                what: "index entry",
                source,
            };
            let id: [u8; 32] = k
                .as_ref()
                .try_into()
                .map_err(|_| corrupt(invalid("index key", format!("{} bytes", k.len()))))?;
            IndexEntry::decode(ChunkId(id), &v).map_err(corrupt)
        })
    }

    /// The slot's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of indexed blobs.
    pub fn len(&self) -> usize {
        self.db.len()
    }

    /// True when nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.db.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn entry_round_trip(offset in 16u64.., stored in any::<u32>(), raw in any::<u32>(), pack in any::<[u8; 16]>()) {
            let e = IndexEntry {
                pack: PackId(pack),
                entry: PackEntry { id: ChunkId([5; 32]), kind: BlobKind::Tree, compression: Compression::Zstd, offset, stored_len: stored, raw_len: raw },
            };
            prop_assert_eq!(e.encode().len(), INDEX_ENTRY_LEN);
            prop_assert_eq!(IndexEntry::decode(ChunkId([5; 32]), &e.encode()).unwrap(), e);
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = IndexEntry::decode(ChunkId([0; 32]), &bytes);
        }
    }
}

#[cfg(test)]
mod slot_tests {
    use super::*;

    #[test]
    fn forget_pack_removes_only_entries_still_pointing_into_it() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open_slot(dir.path()).unwrap();
        let entry = |n: u8| PackEntry {
            id: ChunkId([n; 32]),
            kind: BlobKind::Data,
            compression: Compression::None,
            offset: 16,
            stored_len: 1,
            raw_len: 1,
        };
        let (old, new) = (PackId([1; 16]), PackId([2; 16]));
        index.insert_pack(old, &[entry(1), entry(2)]).unwrap();
        index.insert_pack(new, &[entry(2)]).unwrap(); // blob 2 moved to the new pack
        assert_eq!(index.packs().unwrap().len(), 2);
        assert_eq!(index.forget_pack(old).unwrap().len(), 2);
        assert!(index.get(&ChunkId([1; 32])).unwrap().is_none());
        assert_eq!(index.get(&ChunkId([2; 32])).unwrap().unwrap().pack, new);
        assert_eq!(index.packs().unwrap(), [new].into_iter().collect());
    }
}
