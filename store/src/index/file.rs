//! Index files: which blob is in which pack, at which offset, for a set of packs.
//!
//! Index files are the repository's source of truth for locating blobs (the packs' own trailers
//! are the backup of that truth, from which `repair index` rebuilds them). Each process writes
//! its own after the packs it names are durable and before any manifest relies on them; prune
//! merges them. An index file is named by the BLAKE3 hash of its bytes, so a name says exactly
//! what it holds and a cache can tell which ones it has seen. Byte layout: docs/format.md,
//! "index file".

use crate::codec::{invalid, split_checksum, Decoder, Encoder, Extension};
use crate::error::DecodeError;
use crate::id::{IndexId, PackId};
use crate::pack::{PackEntry, PACK_HEADER_LEN, TRAILER_ENTRY_LEN};

/// Magic of an index file. Do not change.
pub const INDEX_MAGIC: &[u8; 8] = b"SBKINDX\0";
/// Index file format version.
pub const INDEX_VERSION: u32 = 1;

/// The decoded contents of an index file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IndexFile {
    /// Each pack with the blobs it holds.
    pub packs: Vec<(PackId, Vec<PackEntry>)>,
    /// Optional fields (none defined yet).
    pub extensions: Vec<Extension>,
}

impl IndexFile {
    /// Encodes the file; its name is [`IndexFile::id_of`] these bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        e.bytes(INDEX_MAGIC)
            .u32(INDEX_VERSION)
            .u32(0)
            .u32(self.packs.len() as u32);
        for (pack, entries) in &self.packs {
            e.bytes(&pack.0).u32(entries.len() as u32);
            for entry in entries {
                entry.encode(&mut e);
            }
        }
        e.extensions(&self.extensions);
        e.finish_with_checksum()
    }

    /// The name of an index file with these bytes.
    pub fn id_of(bytes: &[u8]) -> IndexId {
        IndexId(*blake3::hash(bytes).as_bytes())
    }

    /// Decodes and checks an index file.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Decoder::new(bytes);
        d.magic(INDEX_MAGIC)?;
        let version = d.u32()?;
        if version != INDEX_VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let body = split_checksum(bytes)?;
        let mut d = Decoder::new(body);
        d.bytes(12)?; // magic and version, read above
        crate::codec::reserved(d.u32()?.into(), "index file reserved")?;
        let npacks = d.u32()? as usize;
        let mut packs = Vec::with_capacity(npacks.min(d.remaining() / 20));
        for _ in 0..npacks {
            let pack = PackId(d.array()?);
            let n = d.u32()? as usize;
            if n.saturating_mul(TRAILER_ENTRY_LEN) > d.remaining() {
                return Err(invalid(
                    "entry count",
                    format!("{n} entries for pack {pack}"),
                ));
            }
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                let e = PackEntry::decode(&mut d)?;
                if e.offset < PACK_HEADER_LEN {
                    return Err(invalid("blob offset", format!("{}", e.offset)));
                }
                entries.push(e);
            }
            packs.push((pack, entries));
        }
        let extensions = d.extensions()?;
        d.end("index file")?;
        Ok(IndexFile { packs, extensions })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::{BlobKind, Compression};
    use crate::id::ChunkId;
    use proptest::prelude::*;

    fn entry(n: u8, offset: u64) -> PackEntry {
        PackEntry {
            id: ChunkId([n; 32]),
            kind: if n.is_multiple_of(2) {
                BlobKind::Data
            } else {
                BlobKind::Tree
            },
            compression: Compression::Zstd,
            offset,
            stored_len: 100 + u32::from(n),
            raw_len: 200 + u32::from(n),
        }
    }

    /// docs/format.md, "index file": the test vector there is these bytes.
    #[test]
    fn test_vector() {
        let f = IndexFile {
            packs: vec![(PackId([0x11; 16]), vec![entry(1, 16)])],
            extensions: Vec::new(),
        };
        let bytes = f.encode();
        assert_eq!(bytes.len(), 8 + 4 + 4 + 4 + 16 + 4 + 52 + 2 + 16);
        assert_eq!(
            crate::id::to_hex(&bytes[..20]),
            "53424b494e445800010000000000000001000000"
        );
        assert_eq!(&bytes[20..36], &[0x11; 16]);
        assert_eq!(IndexFile::decode(&bytes).unwrap(), f);
    }

    proptest! {
        #[test]
        fn round_trip(packs in proptest::collection::vec((any::<[u8; 16]>(), proptest::collection::vec((any::<u8>(), 16u64..1 << 40), 0..5)), 0..5)) {
            let f = IndexFile {
                packs: packs.into_iter().map(|(p, es)| (PackId(p), es.into_iter().map(|(n, o)| entry(n, o)).collect())).collect(),
                extensions: vec![Extension { tag: 7, required: false, value: b"later".to_vec() }],
            };
            prop_assert_eq!(IndexFile::decode(&f.encode()).unwrap(), f);
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = IndexFile::decode(&bytes);
        }
    }

    #[test]
    fn flipped_bits_and_unknown_required_extensions_are_refused() {
        let f = IndexFile {
            packs: vec![(PackId([3; 16]), vec![entry(2, 16), entry(3, 400)])],
            extensions: Vec::new(),
        };
        let bytes = f.encode();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(IndexFile::decode(&bad).is_err(), "flip at {i}");
        }
        let later = IndexFile {
            extensions: vec![Extension {
                tag: 9,
                required: true,
                value: Vec::new(),
            }],
            ..f
        };
        assert!(matches!(
            IndexFile::decode(&later.encode()),
            Err(DecodeError::UnsupportedFeature(_))
        ));
    }
}
