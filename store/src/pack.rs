//! Pack files: append-only containers of blobs that describe themselves.
//!
//! A pack is a 16-byte header, then blobs (each a [`BlobHeader`] and its stored bytes), then a
//! trailer listing every blob with its offset, then a fixed footer with a checksum. The index can
//! be rebuilt from the trailers alone; a pack whose trailer is lost can still be walked blob by
//! blob from the header. Byte layout: docs/format.md, "pack".

use std::path::PathBuf;

use std::sync::Arc;

use crate::backend::{Backend, Kind, Staged};
use crate::blob::{BlobHeader, BlobKind, Compression, EncodedBlob, BLOB_HEADER_LEN};
use crate::codec::{invalid, Decoder, Encoder};
use crate::crypto::{Crypto, SealedFor};
use crate::error::{DecodeError, Result, StoreError};
use crate::id::{ChunkId, PackId};

/// Magic of a pack header. Do not change.
pub const PACK_MAGIC: &[u8; 8] = b"SBKPACK\0";
/// Magic of a pack footer. Do not change.
pub const FOOTER_MAGIC: &[u8; 8] = b"SBKTRLR\0";
/// Pack format version.
pub const PACK_VERSION: u32 = 1;
/// Size of the pack header.
pub const PACK_HEADER_LEN: u64 = 16;
/// Size of one trailer entry.
pub const TRAILER_ENTRY_LEN: usize = 52;
/// Size of the footer at the very end of a pack.
pub const FOOTER_LEN: usize = 56;

/// The size of a pack holding exactly these blobs (`stored` bytes of blobs, headers included,
/// in `blobs` blobs), without what sealing adds to its trailer (under 64 bytes): a pack larger
/// than this by more holds blobs no index file names.
pub fn pack_size_of(blobs: usize, stored: u64) -> u64 {
    PACK_HEADER_LEN + stored + (blobs * TRAILER_ENTRY_LEN + FOOTER_LEN) as u64
}

/// One blob as the trailer (and the index) knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    /// The blob's id.
    pub id: ChunkId,
    /// What it holds.
    pub kind: BlobKind,
    /// How it is stored.
    pub compression: Compression,
    /// Offset of its [`BlobHeader`] in the pack.
    pub offset: u64,
    /// Stored bytes after the header.
    pub stored_len: u32,
    /// Bytes after decompression.
    pub raw_len: u32,
}

impl PackEntry {
    pub(crate) fn encode(&self, e: &mut Encoder) {
        e.bytes(&self.id.0)
            .u8(self.kind as u8)
            .u8(self.compression as u8)
            .u16(0)
            .u64(self.offset)
            .u32(self.stored_len)
            .u32(self.raw_len);
    }

    pub(crate) fn decode(d: &mut Decoder<'_>) -> Result<Self, DecodeError> {
        let id = ChunkId(d.array()?);
        Self::decode_after_id(id, d, "trailer entry reserved")
    }

    /// Decodes the fields that follow the id (in a trailer, and in an index cache table after
    /// the pack number); `reserved` names the reserved field in an error.
    pub(crate) fn decode_after_id(
        id: ChunkId,
        d: &mut Decoder<'_>,
        reserved: &'static str,
    ) -> Result<Self, DecodeError> {
        let kind = BlobKind::from_u8(d.u8()?)?;
        let compression = Compression::from_u8(d.u8()?)?;
        crate::codec::reserved(d.u16()?.into(), reserved)?;
        Ok(PackEntry {
            id,
            kind,
            compression,
            offset: d.u64()?,
            stored_len: d.u32()?,
            raw_len: d.u32()?,
        })
    }

    /// Offset just past the blob's stored bytes.
    pub fn end(&self) -> u64 {
        self.offset + BLOB_HEADER_LEN as u64 + u64::from(self.stored_len)
    }
}

/// Encodes the trailer and footer of a pack whose blobs end at `entries_offset`; the entries are
/// sealed in an encrypted repository.
pub fn encode_trailer(
    pack: PackId,
    entries_offset: u64,
    entries: &[PackEntry],
    crypto: &Crypto,
) -> std::io::Result<Vec<u8>> {
    let mut plain = Encoder::default();
    for entry in entries {
        entry.encode(&mut plain);
    }
    let mut e = Encoder::default();
    e.bytes(&crypto.seal(SealedFor::Trailer(&pack), &plain.buf)?);
    e.bytes(FOOTER_MAGIC)
        .u32(PACK_VERSION)
        .u32(entries.len() as u32)
        .u64(entries_offset)
        .bytes(&pack.0);
    Ok(e.finish_with_checksum())
}

/// Decodes a pack's footer from its last [`FOOTER_LEN`] bytes: (entry count, entries offset, pack
/// id). `overhead` is what sealing adds to the entries (0 unencrypted).
pub fn decode_footer(
    footer: &[u8],
    pack_len: u64,
    overhead: usize,
) -> Result<(u32, u64, PackId), DecodeError> {
    let mut d = Decoder::new(footer);
    d.magic(FOOTER_MAGIC)?;
    let version = d.u32()?;
    if version != PACK_VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let count = d.u32()?;
    let entries_offset = d.u64()?;
    let pack = PackId(d.array()?);
    let expected = (count as u64)
        .checked_mul(TRAILER_ENTRY_LEN as u64)
        .and_then(|n| n.checked_add(entries_offset))
        .and_then(|n| n.checked_add((FOOTER_LEN + overhead) as u64));
    if entries_offset < PACK_HEADER_LEN || expected != Some(pack_len) {
        return Err(invalid(
            "trailer",
            format!("{count} entries at {entries_offset} do not fit a pack of {pack_len} bytes"),
        ));
    }
    Ok((count, entries_offset, pack))
}

/// Decodes the entries and footer (everything from `entries_offset` to the end of the pack)
/// and checks them: the checksum, the pack id, and that every blob lies inside the blob area
/// without overlapping another.
pub fn decode_trailer(
    trailer: &[u8],
    entries_offset: u64,
    pack: PackId,
    crypto: &Crypto,
) -> Result<Vec<PackEntry>, DecodeError> {
    let body = crate::codec::split_checksum(trailer)?;
    let footer_start = body
        .len()
        .checked_sub(FOOTER_LEN - 16)
        .ok_or(DecodeError::Truncated {
            needed: FOOTER_LEN,
            available: trailer.len(),
        })?;
    let (count, offset, id) = decode_footer(
        &trailer[footer_start..],
        entries_offset + trailer.len() as u64,
        crypto.overhead(),
    )?;
    if id != pack {
        return Err(invalid("pack id", format!("trailer names pack {id}")));
    }
    if offset != entries_offset {
        return Err(invalid(
            "entries offset",
            format!("{offset}, expected {entries_offset}"),
        ));
    }
    let plain = crypto.open(SealedFor::Trailer(&pack), &body[..footer_start])?;
    let mut d = Decoder::new(&plain);
    let mut entries = Vec::with_capacity(count as usize);
    let mut next_free = PACK_HEADER_LEN;
    for _ in 0..count {
        let e = PackEntry::decode(&mut d)?;
        let end = e
            .offset
            .checked_add(BLOB_HEADER_LEN as u64 + u64::from(e.stored_len))
            .ok_or_else(|| invalid("blob offset", "overflows"))?;
        if e.offset < next_free || end > entries_offset {
            return Err(invalid(
                "blob offset",
                format!(
                    "blob {} at {} overlaps or lies outside the blob area",
                    e.id, e.offset
                ),
            ));
        }
        next_free = end;
        entries.push(e);
    }
    d.end("trailer")?;
    Ok(entries)
}

fn pack_label(pack: PackId) -> PathBuf {
    Kind::Pack.object_path(&pack.to_hex())
}

/// Appends blobs to a new pack, then seals it durably.
///
/// The pack is staged ([`Backend::stage`]): nothing is visible under its name until
/// [`PackWriter::finish`] has made it whole and durable; a crash leaves at most a temporary
/// object, and an abandoned writer removes its own.
pub struct PackWriter {
    id: PackId,
    out: Box<dyn Staged>,
    entries: Vec<PackEntry>,
    crypto: Arc<Crypto>,
}

impl PackWriter {
    /// Starts a new pack with a random id; its trailer will be sealed with `crypto`.
    pub fn create(backend: &dyn Backend, crypto: Arc<Crypto>) -> Result<Self> {
        let id = PackId::random().map_err(|e| StoreError::io(backend.location(), e))?;
        let mut out = backend.stage(Kind::Pack, &id.to_hex())?;
        let mut header = Encoder::default();
        header.bytes(PACK_MAGIC).u32(PACK_VERSION).u32(0);
        out.write(&header.buf)?;
        Ok(PackWriter {
            id,
            out,
            entries: Vec::new(),
            crypto,
        })
    }

    /// The pack's id.
    pub fn id(&self) -> PackId {
        self.id
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.out.len()
    }

    /// True when no blob has been added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends a blob, which must be sealed exactly when the repository is encrypted: a plain
    /// blob never enters an encrypted repository.
    pub fn add(&mut self, blob: &EncodedBlob) -> Result<()> {
        let h = &blob.header;
        if h.sealed != self.crypto.is_sealed() {
            return Err(StoreError::InvalidParameter(format!(
                "blob {} is {}sealed, the repository is {}encrypted",
                h.id,
                if h.sealed { "" } else { "not " },
                if self.crypto.is_sealed() { "" } else { "not " }
            )));
        }
        let offset = self.out.len();
        self.out.write(&h.encode())?;
        self.out.write(&blob.data)?;
        self.entries.push(PackEntry {
            id: h.id,
            kind: h.kind,
            compression: h.compression,
            offset,
            stored_len: h.stored_len,
            raw_len: h.raw_len,
        });
        Ok(())
    }

    /// Writes the trailer and makes the pack durable under its name. Returns the id and the
    /// entries, which an index file may now name.
    pub fn finish(mut self) -> Result<(PackId, Vec<PackEntry>)> {
        let trailer = encode_trailer(self.id, self.out.len(), &self.entries, &self.crypto)
            .map_err(|e| StoreError::io("pack trailer", e))?;
        self.out.write(&trailer)?;
        self.out.finish()?;
        Ok((self.id, self.entries))
    }

    /// Abandons the pack, removing what was written of it.
    pub fn abandon(self) {
        drop(self)
    }
}

/// Reads and checks the trailer of `pack`.
pub fn read_trailer(
    backend: &dyn Backend,
    pack: PackId,
    crypto: &Crypto,
) -> Result<Vec<PackEntry>> {
    let name = pack.to_hex();
    let corrupt = |source| StoreError::Corrupt {
        path: pack_label(pack),
        what: "pack trailer",
        source,
    };
    let len = backend.size(Kind::Pack, &name)?;
    if len < PACK_HEADER_LEN + FOOTER_LEN as u64 {
        return Err(corrupt(DecodeError::Truncated {
            needed: PACK_HEADER_LEN as usize + FOOTER_LEN,
            available: len as usize,
        }));
    }
    let mut footer = [0u8; FOOTER_LEN];
    backend.read_at(Kind::Pack, &name, len - FOOTER_LEN as u64, &mut footer)?;
    let (_, entries_offset, _) = decode_footer(&footer, len, crypto.overhead()).map_err(corrupt)?;
    let mut trailer = vec![0u8; (len - entries_offset) as usize];
    backend.read_at(Kind::Pack, &name, entries_offset, &mut trailer)?;
    decode_trailer(&trailer, entries_offset, pack, crypto).map_err(corrupt)
}

/// Checks the blob header at the start of `bytes` against what the trailer or index says, and
/// that it is sealed exactly when the repository is encrypted (a blob that claims to be plain
/// in an encrypted repository would bypass authentication).
pub(crate) fn check_blob_header(
    bytes: &[u8],
    entry: &PackEntry,
    pack: PackId,
    sealed: bool,
) -> Result<BlobHeader> {
    let corrupt = |source| StoreError::Corrupt {
        path: pack_label(pack),
        what: "blob header",
        source,
    };
    let header = BlobHeader::decode(bytes).map_err(corrupt)?;
    if header.id != entry.id
        || header.stored_len != entry.stored_len
        || header.raw_len != entry.raw_len
        || header.compression != entry.compression
        || header.kind != entry.kind
        || header.sealed != sealed
    {
        return Err(corrupt(invalid(
            "blob header",
            format!(
                "at offset {} describes blob {}, expected {}",
                entry.offset, header.id, entry.id
            ),
        )));
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::encode_blob;

    #[test]
    fn write_then_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let b = crate::backend::LocalBackend::new(&dir.path().join("r"));
        b.create().unwrap();
        let mut w = PackWriter::create(&b, Arc::new(Crypto::Plain)).unwrap();
        let blobs: Vec<_> = (0..5u8)
            .map(|i| {
                encode_blob(
                    ChunkId([i; 32]),
                    BlobKind::Data,
                    &vec![i; 1000 * i as usize],
                    3,
                )
                .unwrap()
            })
            .collect();
        for blob in &blobs {
            w.add(blob).unwrap();
        }
        let (id, entries) = w.finish().unwrap();
        assert_eq!(read_trailer(&b, id, &Crypto::Plain).unwrap(), entries);
        for (e, blob) in entries.iter().zip(&blobs) {
            let mut buf = vec![0u8; BLOB_HEADER_LEN + e.stored_len as usize];
            b.read_at(Kind::Pack, &id.to_hex(), e.offset, &mut buf)
                .unwrap();
            assert_eq!(check_blob_header(&buf, e, id, false).unwrap(), blob.header);
            assert_eq!(&buf[BLOB_HEADER_LEN..], blob.data);
        }
        // Truncation anywhere is a typed error.
        let path = b.path_of(Kind::Pack, &id.to_hex());
        let bytes = std::fs::read(&path).unwrap();
        for cut in [0, 10, bytes.len() / 2, bytes.len() - 1] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            assert!(
                matches!(
                    read_trailer(&b, id, &Crypto::Plain),
                    Err(StoreError::Corrupt { .. })
                ),
                "cut at {cut}"
            );
        }
        // A pack renamed to another id is refused.
        std::fs::write(&path, &bytes).unwrap();
        let other = PackId([9; 16]);
        std::fs::rename(&path, b.path_of(Kind::Pack, &other.to_hex())).unwrap();
        assert!(read_trailer(&b, other, &Crypto::Plain).is_err());
    }

    #[test]
    fn trailer_decoder_rejects_garbage() {
        let pack = PackId([1; 16]);
        let e = PackEntry {
            id: ChunkId([2; 32]),
            kind: BlobKind::Data,
            compression: Compression::None,
            offset: PACK_HEADER_LEN,
            stored_len: 10,
            raw_len: 10,
        };
        let entries_offset = e.end();
        for crypto in [
            Crypto::Plain,
            Crypto::sealed(crate::crypto::MasterKey::random().unwrap()),
        ] {
            let t = encode_trailer(pack, entries_offset, &[e], &crypto).unwrap();
            assert_eq!(
                decode_trailer(&t, entries_offset, pack, &crypto).unwrap(),
                vec![e]
            );
            for i in 0..t.len() {
                let mut bad = t.clone();
                bad[i] ^= 0x40;
                assert!(
                    decode_trailer(&bad, entries_offset, pack, &crypto).is_err(),
                    "flip at {i}"
                );
            }
        }
    }
}
