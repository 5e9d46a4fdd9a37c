//! Blobs: the one way they are written ([`Repository::encode_blob`]) and the one way they are
//! read ([`Repository::read_blobs`], and the single-blob paths built on it). Nothing outside this file
//! splits a blob from its header, opens it or checks its id: every byte a caller gets from a
//! pack was checked against the index, opened (decrypted and authenticated), decompressed and
//! hashed back to its id first.

use crate::backend::Kind;
use crate::blob::{
    decode_blob_into, encode_blob, encode_blob_with, BlobHeader, BlobKind, EncodedBlob,
    BLOB_HEADER_LEN,
};
use crate::crypto::SealedFor;
use crate::error::{DecodeError, Result, StoreError};
use crate::id::{ChunkId, PackId};
use crate::index::IndexEntry;
use crate::manifest::{decode_tree, Extent};
use crate::pack::{check_blob_header, PackEntry};

use super::Repository;

/// What a read does when the pack it reads is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackGone {
    /// Fails: the caller checks that very pack (verify, prune's repack under its lock).
    Fail,
    /// Finds the blobs again through the index (restore, serve, copy): a prune beside us moved
    /// the blobs a snapshot uses to another pack before deleting this one (docs/design.md,
    /// "prune"), and the index, refreshed, knows where. A blob a snapshot refers to moves; it
    /// never goes.
    FollowIndex,
}

/// What the read path hands each blob to: its position among the blobs asked for, and the blob
/// or why its header is wrong.
type BlobSink<'s, E> = dyn FnMut(usize, Result<StoredBlob<'_>>) -> std::result::Result<(), E> + 's;

/// Largest read of neighbouring blobs in one go.
pub const READ_RUN_BYTES: u64 = 8 << 20;

/// Blobs further apart than this are read apart: reading the gap would cost more than a second
/// request (restore coalesces by the same rule).
pub const READ_GAP_BYTES: u64 = 256 << 10;

/// Fails unless `entries` are sorted by offset and none overlaps the next: the read path splits
/// one read into blobs, and entries that say otherwise (a damaged index) are an error, not a
/// panic.
fn check_order(pack: PackId, entries: &[PackEntry]) -> Result<()> {
    match entries.windows(2).find(|w| w[1].offset < w[0].end()) {
        None => Ok(()),
        Some(w) => Err(StoreError::Corrupt {
            path: Kind::Pack.object_path(&pack.to_hex()),
            what: "index entries",
            source: DecodeError::Invalid {
                field: "offset",
                detail: format!(
                    "blob {} at {} overlaps or precedes blob {} ending at {}",
                    w[1].id,
                    w[1].offset,
                    w[0].id,
                    w[0].end()
                ),
            },
        }),
    }
}

/// `entries` (sorted by offset) in runs read together, each at most [`READ_RUN_BYTES`] long
/// unless one blob is larger and with no gap over [`READ_GAP_BYTES`], with the position of each
/// run's first entry.
fn read_runs(entries: &[PackEntry]) -> impl Iterator<Item = (usize, &[PackEntry])> {
    let mut rest = entries;
    let mut base = 0;
    std::iter::from_fn(move || {
        let first = rest.first()?;
        // A run ends where the next blob would make it too long, or lies too far past the last
        // one to be worth reading the gap (the unused blobs a repack skips).
        let n = rest
            .windows(2)
            .position(|w| {
                w[1].end() - first.offset > READ_RUN_BYTES
                    || w[1].offset - w[0].end() > READ_GAP_BYTES
            })
            .map_or(rest.len(), |i| i + 1);
        let (run, tail) = rest.split_at(n);
        rest = tail;
        base += n;
        Some((base - n, run))
    })
}

/// A blob as stored in a pack, its header checked against the index. Its bytes leave only
/// opened and verified ([`StoredBlob::open_into`]), or as stored once verified, to be copied
/// into another pack of the same repository ([`StoredBlob::verified_copy`]).
pub struct StoredBlob<'a> {
    repo: &'a Repository,
    pack: PackId,
    entry: PackEntry,
    header: BlobHeader,
    /// The stored bytes after the header: sealed when the repository is encrypted.
    stored: &'a mut [u8],
}

impl StoredBlob<'_> {
    /// The blob as the pack's trailer lists it.
    pub fn entry(&self) -> &PackEntry {
        &self.entry
    }

    /// The pack it was read from.
    pub fn pack(&self) -> PackId {
        self.pack
    }

    /// Opens the blob in place, decompresses it into `out` (exactly `raw_len` bytes) and checks
    /// that the result hashes to its id. Nothing unverified ever leaves this function.
    pub fn open_into(self, out: &mut [u8]) -> Result<()> {
        let entry = self.entry;
        let corrupt = |detail: String| StoreError::BlobCorrupt {
            id: entry.id,
            pack: self.pack,
            detail,
        };
        let plain = self
            .repo
            .crypto
            .open_in_place(SealedFor::Blob(entry.kind, &entry.id), self.stored)
            .map_err(|e| corrupt(e.to_string()))?;
        decode_blob_into(entry.compression, plain, out).map_err(|e| corrupt(e.to_string()))?;
        let got = self.repo.blob_id(out);
        if got != entry.id {
            return Err(corrupt(format!("contents hash to {got}")));
        }
        Ok(())
    }

    /// The blob as stored (sealed, when encrypted: the associated data binds a blob to its
    /// id, not its pack), for another pack of this repository, once its contents are verified
    /// (decoded into `scratch`): a damaged blob is never spread.
    pub fn verified_copy(self, scratch: &mut Vec<u8>) -> Result<EncodedBlob> {
        let copy = EncodedBlob {
            header: self.header,
            data: self.stored.to_vec(),
        };
        scratch.resize(self.entry.raw_len as usize, 0);
        self.open_into(scratch)?;
        Ok(copy)
    }
}

impl Repository {
    /// The id of a blob with these raw bytes: BLAKE3 keyed with the repository's key.
    pub fn blob_id(&self, raw: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.chunk_key, raw).as_bytes())
    }

    /// A blob of these raw bytes, ready for a pack: compressed at the repository's level
    /// (kept raw when that does not help) and, encrypted, sealed to its kind and id.
    pub fn encode_blob(&self, id: ChunkId, kind: BlobKind, raw: &[u8]) -> Result<EncodedBlob> {
        let io = |e| StoreError::io("blob", e);
        let level = self.config.zstd_level;
        if !self.crypto.is_sealed() {
            return encode_blob(id, kind, raw, level).map_err(io);
        }
        // Sealed straight from the compressor's buffer.
        let seal = |stored: &[u8]| self.crypto.seal(SealedFor::Blob(kind, &id), stored);
        let mut blob = encode_blob_with(id, kind, raw, level, seal).map_err(io)?;
        blob.header.sealed = true;
        Ok(blob)
    }

    /// The one way blobs are read: blobs `entries` of `pack` (sorted by offset), in few large
    /// reads into `buf` (runs of neighbours, each at most [`READ_RUN_BYTES`] unless one blob is
    /// larger, so that memory is bounded whatever the pack size). Each blob's header is checked
    /// against its entry, and each is handed to `each` with its position in `entries`: as a
    /// [`StoredBlob`], or the reason its header is wrong (the others go on). A read that fails
    /// fails the call, unless the pack is gone and `gone` says to follow the index there.
    pub fn read_blobs<E: From<StoreError>>(
        &self,
        pack: PackId,
        entries: &[PackEntry],
        gone: PackGone,
        buf: &mut Vec<u8>,
        mut each: impl FnMut(usize, Result<StoredBlob<'_>>) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        check_order(pack, entries)?;
        for (base, run) in read_runs(entries) {
            match self.read_range(pack, run, buf) {
                Ok(()) => self.hand_out(pack, run, buf, &mut |i, blob| each(base + i, blob))?,
                Err(StoreError::PackMissing { .. }) if gone == PackGone::FollowIndex => {
                    self.refresh_index()?;
                    for (i, entry) in run.iter().enumerate() {
                        let moved = self.locate(&entry.id)?;
                        let one = std::slice::from_ref(&moved.entry);
                        self.read_range(moved.pack, one, buf)?;
                        self.hand_out(moved.pack, one, buf, &mut |_, blob| each(base + i, blob))?;
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Reads the bytes of `pack` from the first of `entries` to the end of the last into `buf`.
    fn read_range(&self, pack: PackId, entries: &[PackEntry], buf: &mut Vec<u8>) -> Result<()> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            buf.clear();
            return Ok(());
        };
        buf.resize((last.end() - first.offset) as usize, 0);
        self.read_pack(pack, first.offset, buf)
    }

    /// Hands out the blobs [`Repository::read_range`] read into `buf`.
    fn hand_out<E: From<StoreError>>(
        &self,
        pack: PackId,
        entries: &[PackEntry],
        buf: &mut [u8],
        each: &mut BlobSink<'_, E>,
    ) -> std::result::Result<(), E> {
        let sealed = self.crypto.is_sealed();
        let mut rest = buf;
        let mut at = entries.first().map_or(0, |e| e.offset);
        for (i, entry) in entries.iter().enumerate() {
            // Each blob's bytes are split off in turn: blobs are sorted and never overlap.
            let skip = (entry.offset - at) as usize;
            let len = (entry.end() - entry.offset) as usize;
            let (bytes, tail) = std::mem::take(&mut rest)[skip..].split_at_mut(len);
            rest = tail;
            at = entry.end();
            // A header that agrees with the entry is followed by exactly its stored bytes.
            let blob = check_blob_header(bytes, entry, pack, sealed).map(|header| StoredBlob {
                repo: self,
                pack,
                entry: *entry,
                header,
                stored: &mut bytes[BLOB_HEADER_LEN..],
            });
            each(i, blob)?;
        }
        Ok(())
    }

    /// Reads the header of blob `entry` of `pack` and checks it against the entry (a structural
    /// check that reads no data).
    pub fn check_blob_header_at(&self, pack: PackId, entry: &PackEntry) -> Result<()> {
        let mut header = [0u8; BLOB_HEADER_LEN];
        self.read_pack(pack, entry.offset, &mut header)?;
        check_blob_header(&header, entry, pack, self.crypto.is_sealed()).map(|_| ())
    }

    /// Reads, decompresses and verifies one blob of the expected kind.
    pub fn read_blob(&self, id: &ChunkId, kind: BlobKind) -> Result<Vec<u8>> {
        self.read_blob_in(id, kind).map(|(_, raw)| raw)
    }

    /// [`Repository::read_blob`], also naming the pack it came from.
    fn read_blob_in(&self, id: &ChunkId, kind: BlobKind) -> Result<(PackId, Vec<u8>)> {
        let mut out = Vec::new();
        let pack = self.read_blob_with(id, kind, &mut Vec::new(), &mut out)?;
        Ok((pack, out))
    }

    /// Where blob `id` of `kind` is, the index refreshed first if it does not know it yet (a
    /// backup finished since it was loaded); a blob of another kind is corrupt.
    pub fn locate_kind(&self, id: &ChunkId, kind: BlobKind) -> Result<IndexEntry> {
        let at = match self.locate(id) {
            Err(StoreError::BlobMissing(_)) => {
                self.refresh_index()?;
                self.locate(id)?
            }
            r => r?,
        };
        expect_kind(&at, kind)?;
        Ok(at)
    }

    /// [`Repository::read_blob`] into `out`, with `stored` as room for the stored bytes: a
    /// caller that reads many blobs passes the same buffers again (or recycled ones), which
    /// saves allocating and zeroing two buffers per blob. Returns the pack it came from.
    pub fn read_blob_with(
        &self,
        id: &ChunkId,
        kind: BlobKind,
        stored: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<PackId> {
        self.read_located(self.locate_kind(id, kind)?, stored, out)
    }

    /// [`Repository::read_blob_with`] of a blob the caller located (a pack that has gone
    /// since is followed through the index, as always). Returns the pack it came from.
    pub fn read_located(
        &self,
        at: IndexEntry,
        stored: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<PackId> {
        let IndexEntry { pack, entry } = at;
        let mut from = pack;
        self.read_blobs(pack, &[entry], PackGone::FollowIndex, stored, |_, blob| {
            let blob = blob?;
            from = blob.pack();
            out.resize(blob.entry().raw_len as usize, 0);
            blob.open_into(out)
        })?;
        Ok(from)
    }

    /// Reads a segment tree and decodes its extents, which must cover `segment_len` bytes.
    pub fn load_tree(&self, id: &ChunkId, segment_len: u64) -> Result<Vec<Extent>> {
        self.load_tree_at(self.locate_kind(id, BlobKind::Tree)?, segment_len)
    }

    /// [`Repository::load_tree`] of a tree the caller located (commands that read every tree
    /// of many snapshots locate them all in one pass over the index, rather than search the
    /// index table once per tree).
    pub fn load_tree_at(&self, at: IndexEntry, segment_len: u64) -> Result<Vec<Extent>> {
        expect_kind(&at, BlobKind::Tree)?;
        let id = at.entry.id;
        let mut raw = Vec::new();
        let pack = self.read_located(at, &mut Vec::new(), &mut raw)?;
        decode_tree(&raw, segment_len).map_err(|e| StoreError::BlobCorrupt {
            id,
            pack,
            detail: format!("segment tree does not decode: {e}"),
        })
    }
}

/// A blob found where a blob of another kind was expected is corrupt.
fn expect_kind(at: &IndexEntry, kind: BlobKind) -> Result<()> {
    if at.entry.kind != kind {
        return Err(StoreError::BlobCorrupt {
            id: at.entry.id,
            pack: at.pack,
            detail: format!("is a {:?} blob, expected {kind:?}", at.entry.kind),
        });
    }
    Ok(())
}
