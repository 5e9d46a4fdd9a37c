//! Marks objects: the packs one prune run found deletable, for a later run to delete.
//!
//! Prune runs beside backups in two phases (docs/design.md, "prune"). Phase 1 writes one marks
//! object naming the packs it would delete; backups that start after it never dedup against a
//! blob in a marked pack. Phase 2, in a later run, deletes the marked packs that are still not
//! needed once every lock older than the mark is gone and the grace period has passed. Byte
//! layout: docs/format.md, "marks object".

use crate::codec::{invalid, split_checksum, Decoder, Encoder};
use crate::error::DecodeError;
use crate::id::PackId;

/// Magic of a marks object. Do not change.
pub const MARKS_MAGIC: &[u8; 8] = b"SBKMARKS";
/// Marks object format version.
pub const MARKS_VERSION: u32 = 1;

/// Why prune marked a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MarkReason {
    /// No snapshot used any blob in it.
    Unused = 1,
    /// No index file named it (left by a backup that died, or one still writing).
    Unindexed = 2,
    /// Too much of it was unused: its used blobs were copied into new packs.
    Repacked = 3,
}

/// The decoded contents of a marks object.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Marks {
    /// The marked packs, each with the reason.
    pub packs: Vec<(PackId, MarkReason)>,
}

impl Marks {
    /// Encodes the object.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        e.bytes(MARKS_MAGIC)
            .u32(MARKS_VERSION)
            .u32(self.packs.len() as u32);
        for (pack, reason) in &self.packs {
            e.bytes(&pack.0).u8(*reason as u8);
        }
        e.finish_with_checksum()
    }

    /// Decodes a marks object.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Decoder::new(bytes);
        d.magic(MARKS_MAGIC)?;
        let version = d.u32()?;
        if version != MARKS_VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let body = split_checksum(bytes)?;
        let mut d = Decoder::new(body);
        d.bytes(12)?;
        let n = d.u32()? as usize;
        // Each entry takes 17 bytes: a count beyond what is left is a lie, refused before
        // anything is allocated for it.
        if n > d.remaining() / 17 {
            return Err(invalid("marks count", format!("{n}")));
        }
        let mut packs = Vec::with_capacity(n);
        for _ in 0..n {
            let pack = PackId(d.array()?);
            let reason = match d.u8()? {
                1 => MarkReason::Unused,
                2 => MarkReason::Unindexed,
                3 => MarkReason::Repacked,
                r => return Err(invalid("mark reason", format!("{r}"))),
            };
            packs.push((pack, reason));
        }
        d.end("marks")?;
        Ok(Marks { packs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reason() -> impl Strategy<Value = MarkReason> {
        prop_oneof![
            Just(MarkReason::Unused),
            Just(MarkReason::Unindexed),
            Just(MarkReason::Repacked)
        ]
    }

    proptest! {
        #[test]
        fn marks_round_trip(packs in proptest::collection::vec((any::<[u8; 16]>(), reason()), 0..50)) {
            let m = Marks { packs: packs.into_iter().map(|(p, r)| (PackId(p), r)).collect() };
            prop_assert_eq!(Marks::decode(&m.encode()).unwrap(), m);
        }

        #[test]
        fn marks_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Marks::decode(&bytes);
        }

        #[test]
        fn any_flipped_byte_is_refused(packs in proptest::collection::vec((any::<[u8; 16]>(), reason()), 1..5), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let m = Marks { packs: packs.into_iter().map(|(p, r)| (PackId(p), r)).collect() };
            let mut bytes = m.encode();
            let i = at.index(bytes.len());
            bytes[i] ^= 1 << bit;
            prop_assert!(Marks::decode(&bytes).is_err());
        }
    }
}
