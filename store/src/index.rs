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
        let _reserved = d.u8()?;
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

/// The sled-backed index of a repository.
pub struct Index {
    db: sled::Db,
    path: PathBuf,
}

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
        Ok(Index {
            db,
            path: path.to_owned(),
        })
    }

    fn error(path: &Path, e: sled::Error) -> StoreError {
        match e {
            // sled holds an exclusive flock on its database while it is open.
            sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                StoreError::Locked {
                    path: path.to_owned(),
                    holder: "another sbk process has the index open".into(),
                }
            }
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

    /// Adds every blob of a sealed pack, in one atomic batch.
    pub fn insert_pack(&self, pack: PackId, entries: &[PackEntry]) -> Result<()> {
        let mut batch = sled::Batch::default();
        for entry in entries {
            batch.insert(
                &entry.id.0,
                IndexEntry {
                    pack,
                    entry: *entry,
                }
                .encode(),
            );
        }
        self.db
            .apply_batch(batch)
            .map_err(|e| Self::error(&self.path, e))
    }

    /// Makes every insert so far durable. Called before a snapshot that relies on them is written.
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

    /// Removes every entry (before a rebuild from the packs).
    pub fn clear(&self) -> Result<()> {
        self.db.clear().map_err(|e| Self::error(&self.path, e))
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
