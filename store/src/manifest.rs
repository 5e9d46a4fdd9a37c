//! Snapshot manifests and the segment trees they point to.
//!
//! A manifest describes one backup of one source: where it came from, when, how large, and the
//! ids of its segment trees. A segment tree is the ordered extent list of one segment, stored as a
//! blob like any chunk, so that an unchanged segment costs no new metadata in the next backup.

use crate::codec::{invalid, split_checksum, Decoder, Encoder, Extension};
use crate::error::DecodeError;
use crate::id::{ChunkId, SnapshotId};

/// Magic of a manifest. Do not change.
pub const MANIFEST_MAGIC: &[u8; 8] = b"SBKSNAP\0";
/// Manifest format version.
pub const MANIFEST_VERSION: u32 = 2;
/// Segment tree format version (first byte of a tree blob).
pub const TREE_VERSION: u8 = 1;

/// Figures a backup records about itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackupFigures {
    /// Bytes read from the source (data extents only; holes are not read).
    pub bytes_read: u64,
    /// Bytes of the source that are zero extents (holes and zero runs).
    pub bytes_zero: u64,
    /// Raw bytes of the chunks this backup added to the repository.
    pub new_raw: u64,
    /// Stored (compressed) bytes this backup added, headers included.
    pub new_stored: u64,
    /// Data chunks referenced.
    pub chunks: u64,
    /// Data chunks that were new.
    pub new_chunks: u64,
    /// Wall time of the backup in milliseconds.
    pub duration_ms: u64,
}

/// One snapshot: a backup of one source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// When the backup started: nanoseconds since the Unix epoch (so that snapshots taken within
    /// one second still sort in the order they were taken).
    pub time_ns: i64,
    /// The source as given (a device or image path).
    pub source: String,
    /// The host the backup was made for.
    pub host: String,
    /// Operator tags.
    pub tags: Vec<String>,
    /// Size of the source in bytes.
    pub size: u64,
    /// Segment size the source was cut into.
    pub segment_size: u64,
    /// The previous snapshot of the same host and source, if any.
    pub parent: Option<SnapshotId>,
    /// Figures of the backup.
    pub figures: BackupFigures,
    /// One segment tree id per segment, in order.
    pub trees: Vec<ChunkId>,
    /// Optional fields (docs/format.md, "extensions"); none are defined yet.
    pub extensions: Vec<Extension>,
}

impl Manifest {
    /// Encodes the manifest (docs/format.md, "snapshot manifest").
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        e.bytes(MANIFEST_MAGIC)
            .u32(MANIFEST_VERSION)
            .i64(self.time_ns)
            .u64(self.size)
            .u64(self.segment_size)
            .str(&self.source)
            .str(&self.host)
            .u32(self.tags.len() as u32);
        for t in &self.tags {
            e.str(t);
        }
        match &self.parent {
            Some(p) => e.u8(1).bytes(&p.0),
            None => e.u8(0),
        };
        let f = &self.figures;
        e.u64(f.bytes_read)
            .u64(f.bytes_zero)
            .u64(f.new_raw)
            .u64(f.new_stored)
            .u64(f.chunks)
            .u64(f.new_chunks)
            .u64(f.duration_ms)
            .u32(self.trees.len() as u32);
        for t in &self.trees {
            e.bytes(&t.0);
        }
        e.extensions(&self.extensions);
        e.finish_with_checksum()
    }

    /// Decodes and checks a manifest.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Decoder::new(bytes);
        d.magic(MANIFEST_MAGIC)?;
        let version = d.u32()?;
        if version != MANIFEST_VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let body = split_checksum(bytes)?;
        let mut d = Decoder::new(body);
        d.bytes(12)?; // magic and version, read above
        let time_ns = d.i64()?;
        let size = d.u64()?;
        let segment_size = d.u64()?;
        let source = d.str("source")?;
        let host = d.str("host")?;
        let ntags = d.u32()? as usize;
        let mut tags = Vec::with_capacity(ntags.min(d.remaining() / 4));
        for _ in 0..ntags {
            tags.push(d.str("tag")?);
        }
        let parent = match d.u8()? {
            0 => None,
            1 => Some(SnapshotId(d.array()?)),
            v => return Err(invalid("parent flag", format!("{v}"))),
        };
        let figures = BackupFigures {
            bytes_read: d.u64()?,
            bytes_zero: d.u64()?,
            new_raw: d.u64()?,
            new_stored: d.u64()?,
            chunks: d.u64()?,
            new_chunks: d.u64()?,
            duration_ms: d.u64()?,
        };
        let ntrees = d.u32()? as usize;
        if segment_size == 0 || segment_size > crate::config::MAX_SEGMENT {
            return Err(invalid("segment_size", format!("{segment_size}")));
        }
        if ntrees as u64 != size.div_ceil(segment_size) {
            return Err(invalid(
                "tree count",
                format!("{ntrees} trees for {size} bytes in segments of {segment_size}"),
            ));
        }
        if d.remaining() < ntrees * 32 {
            return Err(invalid(
                "tree list",
                format!("{} bytes for {ntrees} ids", d.remaining()),
            ));
        }
        let trees = (0..ntrees)
            .map(|_| d.array().map(ChunkId))
            .collect::<Result<_, _>>()?;
        let extensions = d.extensions()?;
        d.end("manifest")?;
        Ok(Manifest {
            time_ns,
            source,
            host,
            tags,
            size,
            segment_size,
            parent,
            figures,
            trees,
            extensions,
        })
    }

    /// Length of segment `i` of this snapshot.
    pub fn segment_len(&self, i: usize) -> u64 {
        let start = i as u64 * self.segment_size;
        (self.size - start).min(self.segment_size)
    }
}

/// One extent of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// `len` zero bytes: a hole, never stored.
    Zero {
        /// Length in bytes.
        len: u32,
    },
    /// A data chunk.
    Data {
        /// The chunk's id.
        id: ChunkId,
        /// Its length in bytes.
        len: u32,
    },
}

impl Extent {
    /// Length in bytes.
    pub fn len(&self) -> u32 {
        match *self {
            Extent::Zero { len } | Extent::Data { len, .. } => len,
        }
    }

    /// True for an empty extent (never written).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Encodes the extent list of one segment as the raw bytes of a tree blob.
pub fn encode_tree(extents: &[Extent]) -> Vec<u8> {
    let mut e = Encoder::default();
    e.u8(TREE_VERSION).u8(0).u16(0).u32(extents.len() as u32);
    for x in extents {
        match x {
            Extent::Zero { len } => e.u8(0).u32(*len),
            Extent::Data { id, len } => e.u8(1).u32(*len).bytes(&id.0),
        };
    }
    e.buf
}

/// Decodes a tree blob and checks that its extents cover exactly `segment_len` bytes.
pub fn decode_tree(bytes: &[u8], segment_len: u64) -> Result<Vec<Extent>, DecodeError> {
    let mut d = Decoder::new(bytes);
    let version = d.u8()?;
    if version != TREE_VERSION {
        return Err(DecodeError::UnsupportedVersion(version.into()));
    }
    crate::codec::reserved(d.u8()?.into(), "tree reserved")?;
    crate::codec::reserved(d.u16()?.into(), "tree reserved")?;
    let n = d.u32()? as usize;
    // Each extent takes at least 5 bytes: a count beyond that is a lie, not an allocation.
    let mut out = Vec::with_capacity(n.min(d.remaining() / 5));
    let mut total = 0u64;
    for _ in 0..n {
        let x = match d.u8()? {
            0 => Extent::Zero { len: d.u32()? },
            1 => {
                let len = d.u32()?;
                Extent::Data {
                    len,
                    id: ChunkId(d.array()?),
                }
            }
            t => return Err(invalid("extent tag", format!("{t}"))),
        };
        if x.is_empty() {
            return Err(invalid("extent length", "zero"));
        }
        total += u64::from(x.len());
        out.push(x);
    }
    d.end("tree")?;
    if total != segment_len {
        return Err(invalid(
            "tree",
            format!("extents cover {total} bytes, segment has {segment_len}"),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn extent() -> impl Strategy<Value = Extent> {
        prop_oneof![
            (1u32..1 << 20).prop_map(|len| Extent::Zero { len }),
            (1u32..1 << 20, any::<[u8; 32]>()).prop_map(|(len, id)| Extent::Data {
                len,
                id: ChunkId(id)
            }),
        ]
    }

    fn manifest() -> impl Strategy<Value = Manifest> {
        (
            any::<i64>(),
            ".{0,40}",
            ".{0,20}",
            proptest::collection::vec(".{0,10}", 0..4),
            0u64..1 << 40,
            proptest::option::of(any::<[u8; 32]>()),
            any::<[u64; 7]>(),
        )
            .prop_map(|(time, source, host, tags, size, parent, f)| {
                let segment_size = 1 << 24;
                Manifest {
                    time_ns: time,
                    source,
                    host,
                    tags,
                    size: size % (1 << 30),
                    segment_size,
                    parent: parent.map(SnapshotId),
                    figures: BackupFigures {
                        bytes_read: f[0],
                        bytes_zero: f[1],
                        new_raw: f[2],
                        new_stored: f[3],
                        chunks: f[4],
                        new_chunks: f[5],
                        duration_ms: f[6],
                    },
                    trees: (0..(size % (1 << 30)).div_ceil(segment_size))
                        .map(|i| ChunkId([i as u8; 32]))
                        .collect(),
                    extensions: if time % 2 == 0 {
                        Vec::new()
                    } else {
                        vec![Extension {
                            tag: 3,
                            required: false,
                            value: vec![1, 2, 3],
                        }]
                    },
                }
            })
    }

    proptest! {
        #[test]
        fn tree_round_trip(extents in proptest::collection::vec(extent(), 0..50)) {
            let total: u64 = extents.iter().map(|x| u64::from(x.len())).sum();
            prop_assert_eq!(decode_tree(&encode_tree(&extents), total).unwrap(), extents);
        }

        #[test]
        fn tree_with_wrong_total_is_rejected(extents in proptest::collection::vec(extent(), 1..20)) {
            let total: u64 = extents.iter().map(|x| u64::from(x.len())).sum();
            prop_assert!(decode_tree(&encode_tree(&extents), total + 1).is_err());
        }

        #[test]
        fn manifest_round_trip(m in manifest()) {
            prop_assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        }

        #[test]
        fn manifest_corruption_is_caught(m in manifest(), pos in any::<usize>(), bit in 0u8..8) {
            let mut bytes = m.encode();
            let pos = pos % bytes.len();
            bytes[pos] ^= 1 << bit;
            prop_assert!(Manifest::decode(&bytes).is_err());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300), len in any::<u64>()) {
            let _ = Manifest::decode(&bytes);
            let _ = decode_tree(&bytes, len);
        }
    }
}

pub use crate::codec::{EXT_CHANGED_BLOCKS, EXT_ORIGIN};

/// What a snapshot records about changed-block tracking (manifest extension 1, optional).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChangedBlocks {
    /// This run's storage-side snapshot id (`--cbt-token`), which a later list starts from.
    pub token: Option<String>,
    /// The storage-side state the list started from (`--cbt-since`).
    pub since: Option<String>,
    /// The snapshot was made from a changed-block list (segments reused from its parent).
    pub incremental: bool,
    /// The list passed its check (`--verify-unchanged`); false: it lied, and the source was
    /// read in full instead.
    pub trusted: bool,
    /// Segments read.
    pub segments_read: u64,
    /// Segments whose tree was taken from the parent unread.
    pub segments_reused: u64,
    /// Bytes not read thanks to the list.
    pub bytes_skipped: u64,
}

impl ChangedBlocks {
    /// Encodes the extension value.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        e.u8(1)
            .u8(u8::from(self.incremental) | u8::from(self.trusted) << 1)
            .str(self.token.as_deref().unwrap_or(""))
            .str(self.since.as_deref().unwrap_or(""))
            .u64(self.segments_read)
            .u64(self.segments_reused)
            .u64(self.bytes_skipped);
        e.buf
    }

    /// Decodes the extension value.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Decoder::new(bytes);
        let version = d.u8()?;
        if version != 1 {
            return Err(DecodeError::UnsupportedVersion(version.into()));
        }
        let flags = d.u8()?;
        crate::codec::reserved(u64::from(flags & !3), "changed-blocks flags")?;
        let opt = |s: String| (!s.is_empty()).then_some(s);
        let c = ChangedBlocks {
            incremental: flags & 1 != 0,
            trusted: flags & 2 != 0,
            token: opt(d.str("token")?),
            since: opt(d.str("since")?),
            segments_read: d.u64()?,
            segments_reused: d.u64()?,
            bytes_skipped: d.u64()?,
        };
        d.end("changed-blocks extension")?;
        Ok(c)
    }
}

impl Manifest {
    /// The value of the optional extension `tag`, if the manifest has one.
    fn extension(&self, tag: u16) -> Option<&[u8]> {
        self.extensions
            .iter()
            .find(|x| x.tag == tag)
            .map(|x| x.value.as_slice())
    }

    /// Sets the optional extension `tag` (replacing an earlier value).
    fn set_extension(&mut self, tag: u16, value: Vec<u8>) {
        self.extensions.retain(|x| x.tag != tag);
        self.extensions.push(Extension {
            tag,
            required: false,
            value,
        });
    }

    /// The changed-block record, if the snapshot has one (and whether it decodes).
    pub fn changed_blocks(&self) -> Option<Result<ChangedBlocks, DecodeError>> {
        self.extension(EXT_CHANGED_BLOCKS)
            .map(ChangedBlocks::decode)
    }

    /// Records `info` (replacing an earlier record).
    pub fn set_changed_blocks(&mut self, info: &ChangedBlocks) {
        self.set_extension(EXT_CHANGED_BLOCKS, info.encode());
    }
}

/// Where a copied snapshot came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Origin {
    /// The source repository's id.
    pub repo_id: [u8; 16],
    /// The snapshot's id there.
    pub snapshot: SnapshotId,
}

impl Origin {
    /// Encodes the extension value.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.repo_id.to_vec();
        v.extend_from_slice(&self.snapshot.0);
        v
    }

    /// Decodes the extension value.
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        if b.len() != 48 {
            return Err(DecodeError::Invalid {
                field: "origin",
                detail: format!("{} bytes, expected 48", b.len()),
            });
        }
        Ok(Origin {
            repo_id: b[..16].try_into().expect("16 bytes"),
            snapshot: SnapshotId(b[16..].try_into().expect("32 bytes")),
        })
    }
}

impl Manifest {
    /// Where the snapshot was copied from, if it was (and whether the record decodes).
    pub fn origin(&self) -> Option<Result<Origin, DecodeError>> {
        self.extension(EXT_ORIGIN).map(Origin::decode)
    }

    /// Records the origin of a copy.
    pub fn set_origin(&mut self, origin: &Origin) {
        self.set_extension(EXT_ORIGIN, origin.encode());
    }
}

#[cfg(test)]
mod changed_blocks_tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(token in proptest::option::of("[a-z0-9]{1,12}"), since in proptest::option::of("[a-z0-9]{1,12}"), flags in 0u8..4, n in any::<[u64; 3]>()) {
            let c = ChangedBlocks { token, since, incremental: flags & 1 != 0, trusted: flags & 2 != 0, segments_read: n[0], segments_reused: n[1], bytes_skipped: n[2] };
            prop_assert_eq!(ChangedBlocks::decode(&c.encode()).unwrap(), c);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = ChangedBlocks::decode(&bytes);
        }
    }
}
