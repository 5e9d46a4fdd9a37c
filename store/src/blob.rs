//! Blobs: what a pack holds. A blob is a data chunk or a tree (an encoded extent list), stored
//! zstd-compressed unless compression does not shrink it, behind a checksummed header.

use std::cell::RefCell;

use crate::codec::{invalid, Decoder, Encoder};
use crate::error::DecodeError;
use crate::id::ChunkId;

/// Encoded size of a [`BlobHeader`].
pub const BLOB_HEADER_LEN: usize = 48;

/// What a blob holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BlobKind {
    /// A chunk of source data.
    Data = 1,
    /// An encoded segment extent list (see `manifest::SegmentTree`).
    Tree = 2,
}

impl BlobKind {
    /// Decodes the on-disk byte.
    pub fn from_u8(v: u8) -> Result<Self, DecodeError> {
        match v {
            1 => Ok(BlobKind::Data),
            2 => Ok(BlobKind::Tree),
            _ => Err(invalid("blob kind", format!("{v}"))),
        }
    }
}

/// How a blob's bytes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Compression {
    /// Stored as is (compression did not shrink it).
    None = 0,
    /// A single zstd frame.
    Zstd = 1,
}

impl Compression {
    /// Decodes the on-disk byte.
    pub fn from_u8(v: u8) -> Result<Self, DecodeError> {
        match v {
            0 => Ok(Compression::None),
            1 => Ok(Compression::Zstd),
            _ => Err(invalid("compression", format!("{v}"))),
        }
    }
}

/// Largest raw blob sbk writes or accepts (the 16 MiB FastCDC maximum, with room for trees).
pub const MAX_BLOB: u32 = 64 << 20;

/// The header in front of every blob in a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobHeader {
    /// What the blob holds.
    pub kind: BlobKind,
    /// How its bytes are stored.
    pub compression: Compression,
    /// Bytes stored in the pack after the header.
    pub stored_len: u32,
    /// Bytes after decompression.
    pub raw_len: u32,
    /// The blob's id.
    pub id: ChunkId,
    /// The stored bytes are sealed (an encrypted repository): nonce, ciphertext of the
    /// compressed or raw bytes, tag.
    pub sealed: bool,
}

impl BlobHeader {
    /// Encodes the 48-byte header (docs/format.md, "blob header").
    pub fn encode(&self) -> [u8; BLOB_HEADER_LEN] {
        let mut e = Encoder::default();
        e.u8(self.kind as u8)
            .u8(self.compression as u8)
            .u8(u8::from(self.sealed))
            .u8(0)
            .u32(self.stored_len)
            .u32(self.raw_len)
            .bytes(&self.id.0);
        let sum = crate::codec::checksum(&e.buf);
        e.bytes(&sum[..4]);
        let mut out = [0u8; BLOB_HEADER_LEN];
        out.copy_from_slice(&e.buf);
        out
    }

    /// Decodes and checks a header.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Decoder::new(bytes);
        let body = d.bytes(BLOB_HEADER_LEN - 4)?;
        let stored_sum = d.bytes(4)?;
        let sum = crate::codec::checksum(body);
        if &sum[..4] != stored_sum {
            return Err(DecodeError::ChecksumMismatch {
                got: crate::id::to_hex(&sum[..4]),
                expected: crate::id::to_hex(stored_sum),
            });
        }
        let mut d = Decoder::new(body);
        let kind = BlobKind::from_u8(d.u8()?)?;
        let compression = Compression::from_u8(d.u8()?)?;
        let sealed = match d.u8()? {
            0 => false,
            1 => true,
            v => return Err(invalid("blob flags", format!("{v}"))),
        };
        crate::codec::reserved(d.u8()?.into(), "blob header reserved")?;
        let h = BlobHeader {
            kind,
            compression,
            stored_len: d.u32()?,
            raw_len: d.u32()?,
            id: ChunkId(d.array()?),
            sealed,
        };
        h.check_lengths()?;
        Ok(h)
    }

    /// Checks the length fields against each other and [`MAX_BLOB`].
    pub fn check_lengths(&self) -> Result<(), DecodeError> {
        if self.raw_len > MAX_BLOB {
            return Err(invalid(
                "raw_len",
                format!("{} exceeds {MAX_BLOB}", self.raw_len),
            ));
        }
        let overhead = if self.sealed {
            crate::codec::SEAL_OVERHEAD as u64
        } else {
            0
        };
        if self.compression == Compression::None
            && u64::from(self.stored_len) != u64::from(self.raw_len) + overhead
        {
            return Err(invalid(
                "stored_len",
                "differs from raw_len in an uncompressed blob",
            ));
        }
        if self.stored_len as u64 > zstd_bound(self.raw_len) + overhead {
            return Err(invalid(
                "stored_len",
                format!("{} too large for raw_len {}", self.stored_len, self.raw_len),
            ));
        }
        Ok(())
    }
}

/// Upper bound of a zstd frame of `raw` bytes (ZSTD_COMPRESSBOUND).
fn zstd_bound(raw: u32) -> u64 {
    let raw = u64::from(raw);
    raw + (raw >> 8)
        + if raw < (128 << 10) {
            ((128 << 10) - raw) >> 11
        } else {
            0
        }
        + 64
}

/// A blob ready to be appended to a pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedBlob {
    /// Its header.
    pub header: BlobHeader,
    /// The stored bytes (compressed or raw, as the header says).
    pub data: Vec<u8>,
}

thread_local! {
    // A zstd context per thread and level: creating one costs more than compressing a small
    // chunk, and the backup workers compress millions of chunks.
    static COMPRESSOR: RefCell<Option<(u32, zstd::bulk::Compressor<'static>, Vec<u8>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Compresses `raw` at `level` into a blob, keeping it raw when zstd does not make it smaller.
pub fn encode_blob(
    id: ChunkId,
    kind: BlobKind,
    raw: &[u8],
    level: u32,
) -> std::io::Result<EncodedBlob> {
    encode_blob_with(id, kind, raw, level, |stored| Ok(stored.to_vec()))
}

/// The largest chunk whose compression buffer a thread keeps for the next blob: every chunk of
/// the 1 MiB average and below (at most 4 MiB) reuses one.
const KEEP_BUFFER_FOR: usize = 4 << 20;

/// [`encode_blob`], the stored bytes (compressed, or `raw` itself) turned into the blob's data by
/// `store`: an exact-size copy, or the sealed bytes, made straight from the compressor's buffer
/// (one copy of each blob, not two). The header's `stored_len` is the length `store` returns.
pub(crate) fn encode_blob_with(
    id: ChunkId,
    kind: BlobKind,
    raw: &[u8],
    level: u32,
    store: impl FnOnce(&[u8]) -> std::io::Result<Vec<u8>>,
) -> std::io::Result<EncodedBlob> {
    // Compress into a per-thread buffer sized for the worst case; `store` then keeps an
    // exact-size result: a blob waiting in the pipeline holds its stored size, not its raw size.
    let (compression, data) =
        COMPRESSOR.with(|cell| -> std::io::Result<(Compression, Vec<u8>)> {
            let mut slot = cell.borrow_mut();
            if slot.as_ref().map(|(l, _, _)| *l) != Some(level) {
                *slot = Some((
                    level,
                    zstd::bulk::Compressor::new(level as i32)?,
                    Vec::new(),
                ));
            }
            let (_, c, buf) = slot.as_mut().expect("just filled above");
            buf.clear();
            // Exact: a doubled capacity would outgrow what is kept.
            buf.reserve_exact(zstd::zstd_safe::compress_bound(raw.len()));
            let n = c.compress_to_buffer(raw, buf)?;
            let stored = if n < raw.len() {
                (Compression::Zstd, store(&buf[..n])?)
            } else {
                (Compression::None, store(raw)?)
            };
            if buf.capacity() > zstd::zstd_safe::compress_bound(KEEP_BUFFER_FOR) {
                // Only the 2 and 4 MiB averages make chunks this large, and a fresh buffer each
                // costs little beside compressing them; two workers each keeping 16 MiB took a
                // 4 MiB-chunk backup over its 128 MiB budget.
                *buf = Vec::new();
            }
            Ok(stored)
        })?;
    Ok(EncodedBlob {
        header: BlobHeader {
            kind,
            compression,
            stored_len: data.len() as u32,
            raw_len: raw.len() as u32,
            id,
            sealed: false,
        },
        data,
    })
}

/// Decodes stored bytes into `out`, which must be exactly `raw_len` long.
pub fn decode_blob_into(
    compression: Compression,
    stored: &[u8],
    out: &mut [u8],
) -> Result<(), DecodeError> {
    match compression {
        Compression::None => {
            if stored.len() != out.len() {
                return Err(invalid(
                    "stored_len",
                    "differs from raw_len in an uncompressed blob",
                ));
            }
            out.copy_from_slice(stored);
            Ok(())
        }
        Compression::Zstd => DECOMPRESSOR.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = Some(
                    zstd::bulk::Decompressor::new().map_err(|e| invalid("zstd", e.to_string()))?,
                );
            }
            let d = slot.as_mut().expect("just filled above");
            let n = d
                .decompress_to_buffer(stored, out)
                .map_err(|e| invalid("zstd frame", e.to_string()))?;
            if n != out.len() {
                return Err(invalid(
                    "raw_len",
                    format!("frame holds {n} bytes, header says {}", out.len()),
                ));
            }
            Ok(())
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn blob_round_trip(raw in proptest::collection::vec(0u8..4, 0..20_000), level in 1u32..6) {
            let blob = encode_blob(ChunkId([3; 32]), BlobKind::Data, &raw, level).unwrap();
            let header = BlobHeader::decode(&blob.header.encode()).unwrap();
            prop_assert_eq!(header, blob.header);
            let mut out = vec![0u8; header.raw_len as usize];
            decode_blob_into(header.compression, &blob.data, &mut out).unwrap();
            prop_assert_eq!(out, raw);
        }

        #[test]
        fn header_bit_flips_are_caught(pos in 0usize..BLOB_HEADER_LEN, bit in 0u8..8) {
            let blob = encode_blob(ChunkId([3; 32]), BlobKind::Tree, b"hello hello hello", 3).unwrap();
            let mut bytes = blob.header.encode();
            bytes[pos] ^= 1 << bit;
            prop_assert!(BlobHeader::decode(&bytes).is_err());
        }

        #[test]
        fn garbage_frames_are_errors(stored in proptest::collection::vec(any::<u8>(), 0..300), raw_len in 0usize..1000) {
            let mut out = vec![0u8; raw_len];
            let _ = decode_blob_into(Compression::Zstd, &stored, &mut out);
        }
    }

    /// Found by the blob_header fuzz target: a header with its reserved bytes set (and a matching
    /// checksum) decoded, and would have lost them on re-encoding.
    #[test]
    fn nonzero_reserved_bytes_are_rejected() {
        let crash = include_bytes!("../../fuzz/corpus/blob_header/regression-reserved");
        assert!(matches!(
            BlobHeader::decode(crash),
            Err(DecodeError::Invalid { .. })
        ));
    }

    #[test]
    fn incompressible_data_is_stored_raw() {
        let mut raw = vec![0u8; 4096];
        blake3::Hasher::new().finalize_xof().fill(&mut raw);
        let blob = encode_blob(ChunkId([0; 32]), BlobKind::Data, &raw, 3).unwrap();
        assert_eq!(blob.header.compression, Compression::None);
        assert_eq!(blob.data, raw);
    }
}
