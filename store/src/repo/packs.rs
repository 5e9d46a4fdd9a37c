//! Packs: written through [`PackWriter`], listed, read by range, removed.

use crate::backend::Kind;
use crate::error::{DecodeError, Result, StoreError};
use crate::id::PackId;
use crate::pack::{read_trailer, PackEntry, PackWriter};

use super::Repository;

impl Repository {
    /// Starts a new pack.
    pub fn new_pack(&self) -> Result<PackWriter> {
        PackWriter::create(self.b()?, self.crypto.clone())
    }

    /// Every sealed pack with its size, sorted by id.
    pub fn list_packs(&self) -> Result<Vec<(PackId, u64)>> {
        Ok(self
            .b()?
            .list(Kind::Pack)?
            .into_iter()
            .filter_map(|o| o.name.parse().ok().map(|id| (id, o.size)))
            .collect())
    }

    /// Reads and checks a pack's trailer.
    pub fn read_trailer(&self, pack: PackId) -> Result<Vec<PackEntry>> {
        read_trailer(self.b()?, pack, &self.crypto).map_err(|e| pack_error(pack, e))
    }

    /// Fills `buf` from `offset` of a pack.
    pub(super) fn read_pack(&self, pack: PackId, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.b()?
            .read_at(Kind::Pack, &pack.to_hex(), offset, buf)
            .map_err(|e| pack_error(pack, e))
    }

    /// Removes a pack; returns its size. The caller must first have removed it from the index
    /// files (see docs/design.md, "prune"), so that no backup can find its blobs any more.
    pub fn remove_pack(&self, id: PackId, size: u64) -> Result<u64> {
        self.b()?.delete(Kind::Pack, &id.to_hex())?;
        Ok(size)
    }

    /// Removes leftovers of interrupted writes last written before `before` (storage time;
    /// `i64::MAX`, all of them, only under an exclusive lock).
    pub fn remove_leftovers(&self, before: i64) -> Result<u64> {
        self.b()?.remove_leftovers(before)
    }
}

/// A pack read's error, said of the pack: missing is `PackMissing`, too short is a truncated
/// (corrupt) pack.
fn pack_error(pack: PackId, e: StoreError) -> StoreError {
    match e {
        StoreError::ObjectMissing { .. } => StoreError::PackMissing {
            pack,
            path: Kind::Pack.object_path(&pack.to_hex()),
        },
        StoreError::ShortObject { needed, size, .. } => StoreError::Corrupt {
            path: Kind::Pack.object_path(&pack.to_hex()),
            what: "pack",
            source: DecodeError::Truncated {
                needed: needed as usize,
                available: size as usize,
            },
        },
        e => e,
    }
}
