//! The repository config: written once by `init`, immutable afterwards.

use crate::codec::{invalid, split_checksum, Decoder, Encoder};
use crate::error::DecodeError;

/// Magic at the start of the config file. Do not change: it identifies sbk repositories.
pub const CONFIG_MAGIC: &[u8; 8] = b"SBKREPO\0";
/// The repository format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 2;
/// Encoded size of a config file in bytes (fixed).
pub const CONFIG_LEN: usize = 8 + 4 + 16 + 32 + 4 * 3 + 8 + 4 + 8 + 8 + 4 + 8 + 8 + 8 + 16 + 16;

/// Required feature bits this build implements. A repository whose config sets a required bit
/// outside this mask is refused: reading it without the feature would be wrong (encrypted blobs
/// read as plain ones, say).
pub const KNOWN_REQUIRED_FEATURES: u64 = crate::crypto::FEATURE_ENCRYPTED;

/// Largest segment sbk accepts; tree blobs store extent lengths as `u32`.
pub const MAX_SEGMENT: u64 = 1 << 30;

/// Everything a repository fixes at `init`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoConfig {
    /// Format version of the repository.
    pub version: u32,
    /// Random id of the repository.
    pub repo_id: [u8; 16],
    /// Key of the keyed BLAKE3 hash that makes chunk ids.
    pub chunk_key: [u8; 32],
    /// FastCDC minimum chunk size.
    pub chunk_min: u32,
    /// FastCDC average chunk size.
    pub chunk_avg: u32,
    /// FastCDC maximum chunk size.
    pub chunk_max: u32,
    /// Seed of the FastCDC gear table.
    pub chunk_seed: u64,
    /// Zero runs at least this long become zero extents.
    pub zero_min: u32,
    /// Sources are cut into aligned segments of this size, chunked independently.
    pub segment_size: u64,
    /// Packs are closed once they reach this size (1 MiB..1 GiB).
    pub pack_size: u64,
    /// zstd level for new blobs.
    pub zstd_level: u32,
    /// Creation time, seconds since the Unix epoch.
    pub created: i64,
    /// Features a reader must implement to use the repository (docs/format.md, "features").
    pub features_required: u64,
    /// Features a reader may ignore.
    pub features_optional: u64,
    /// With [`crate::crypto::FEATURE_ENCRYPTED`]: the config's authentication tag under the
    /// master key (of bytes 0..128), checked once the repository is unlocked; else zero.
    pub mac: [u8; 16],
}

impl RepoConfig {
    /// The repository id, as messages show it (32 hex digits).
    pub fn id_hex(&self) -> String {
        crate::id::to_hex(&self.repo_id)
    }

    /// Whether the repository is encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.features_required & crate::crypto::FEATURE_ENCRYPTED != 0
    }

    /// Encodes the config (layout in docs/format.md, "config").
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        e.bytes(CONFIG_MAGIC)
            .u32(self.version)
            .bytes(&self.repo_id)
            .bytes(&self.chunk_key)
            .u32(self.chunk_min)
            .u32(self.chunk_avg)
            .u32(self.chunk_max)
            .u64(self.chunk_seed)
            .u32(self.zero_min)
            .u64(self.segment_size)
            .u64(self.pack_size)
            .u32(self.zstd_level)
            .i64(self.created)
            .u64(self.features_required)
            .u64(self.features_optional)
            .bytes(&self.mac);
        e.finish_with_checksum()
    }

    /// Decodes and range-checks a config file.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() < 12 {
            return Err(DecodeError::Truncated {
                needed: 12,
                available: bytes.len(),
            });
        }
        let mut d = Decoder::new(bytes);
        d.magic(CONFIG_MAGIC)?;
        // The version is checked before the checksum so that a newer repository says so
        // instead of looking damaged.
        let version = d.u32()?;
        if version != FORMAT_VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        if bytes.len() != CONFIG_LEN {
            return Err(invalid(
                "config length",
                format!("{} bytes, expected {CONFIG_LEN}", bytes.len()),
            ));
        }
        let body = split_checksum(bytes)?;
        let mut d = Decoder::new(&body[12..]);
        let c = RepoConfig {
            version,
            repo_id: d.array()?,
            chunk_key: d.array()?,
            chunk_min: d.u32()?,
            chunk_avg: d.u32()?,
            chunk_max: d.u32()?,
            chunk_seed: d.u64()?,
            zero_min: d.u32()?,
            segment_size: d.u64()?,
            pack_size: d.u64()?,
            zstd_level: d.u32()?,
            created: d.i64()?,
            features_required: d.u64()?,
            features_optional: d.u64()?,
            mac: d.array()?,
        };
        if c.features_required & crate::crypto::FEATURE_ENCRYPTED == 0 && c.mac != [0; 16] {
            return Err(invalid("config reserved", "must be 0 without encryption"));
        }
        d.end("config")?;
        let unknown = c.features_required & !KNOWN_REQUIRED_FEATURES;
        if unknown != 0 {
            return Err(DecodeError::UnsupportedFeature(format!(
                "required features {unknown:#x}"
            )));
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks the ranges the store relies on (the chunker checks its own parameters).
    pub fn validate(&self) -> Result<(), DecodeError> {
        if self.segment_size == 0
            || !self.segment_size.is_multiple_of(4096)
            || self.segment_size > MAX_SEGMENT
            || self.segment_size < u64::from(self.chunk_max)
        {
            return Err(invalid(
                "segment_size",
                format!(
                    "{} must be a multiple of 4096, at least chunk_max and at most {MAX_SEGMENT}",
                    self.segment_size
                ),
            ));
        }
        if !(1 << 20..=1 << 30).contains(&self.pack_size) {
            return Err(invalid(
                "pack_size",
                format!("{} is outside 1 MiB..1 GiB", self.pack_size),
            ));
        }
        if !(1..=19).contains(&self.zstd_level) {
            return Err(invalid(
                "zstd_level",
                format!("{} is outside 1..=19", self.zstd_level),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn sample() -> RepoConfig {
        RepoConfig {
            version: FORMAT_VERSION,
            repo_id: [1; 16],
            chunk_key: [2; 32],
            chunk_min: 256 << 10,
            chunk_avg: 1 << 20,
            chunk_max: 4 << 20,
            chunk_seed: 42,
            zero_min: 64 << 10,
            segment_size: 16 << 20,
            pack_size: 32 << 20,
            zstd_level: 3,
            created: 1_700_000_000,
            features_required: 0,
            features_optional: 0,
            mac: [0; 16],
        }
    }

    #[test]
    fn round_trip_and_fixed_length() {
        let c = sample();
        let bytes = c.encode();
        assert_eq!(bytes.len(), CONFIG_LEN);
        assert_eq!(RepoConfig::decode(&bytes).unwrap(), c);
    }

    #[test]
    fn newer_version_is_reported_as_such() {
        let mut bytes = sample().encode();
        bytes[8] = 3;
        assert_eq!(
            RepoConfig::decode(&bytes),
            Err(DecodeError::UnsupportedVersion(3))
        );
        bytes[8] = 1;
        assert_eq!(
            RepoConfig::decode(&bytes),
            Err(DecodeError::UnsupportedVersion(1))
        );
    }

    #[test]
    fn unknown_required_features_are_refused_and_optional_ones_kept() {
        let mut c = sample();
        c.features_required = 1 << 5;
        assert!(matches!(
            RepoConfig::decode(&c.encode()),
            Err(DecodeError::UnsupportedFeature(_))
        ));
        let mut c = sample();
        c.mac = [1; 16];
        assert!(matches!(
            RepoConfig::decode(&c.encode()),
            Err(DecodeError::Invalid { .. })
        ));
        let mut c = sample();
        c.features_optional = 1 << 5;
        assert_eq!(RepoConfig::decode(&c.encode()).unwrap(), c);
    }

    /// docs/format.md, "config": the test vector there is the hex of these bytes.
    #[test]
    fn test_vector() {
        let bytes = sample().encode();
        assert_eq!(crate::id::to_hex(&bytes[..12]), "53424b5245504f0002000000");
        assert_eq!(
            crate::id::to_hex(&bytes[bytes.len() - 16..]),
            crate::id::to_hex(&crate::codec::checksum(&bytes[..bytes.len() - 16]))
        );
    }

    #[test]
    fn out_of_range_values_are_rejected() {
        let mut c = sample();
        c.zstd_level = 0;
        assert!(matches!(
            RepoConfig::decode(&c.encode()),
            Err(DecodeError::Invalid { .. })
        ));
        let mut c = sample();
        c.segment_size = 4097;
        assert!(matches!(
            RepoConfig::decode(&c.encode()),
            Err(DecodeError::Invalid { .. })
        ));
    }

    proptest! {
        #[test]
        fn flipped_bytes_never_decode_silently(pos in 0usize..CONFIG_LEN, bit in 0u8..8) {
            let mut bytes = sample().encode();
            bytes[pos] ^= 1 << bit;
            prop_assert!(RepoConfig::decode(&bytes).is_err());
        }

        #[test]
        fn arbitrary_bytes_do_not_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = RepoConfig::decode(&bytes);
        }
    }
}
