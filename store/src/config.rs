//! The repository config: written once by `init`, immutable afterwards.

use crate::codec::{invalid, split_checksum, Decoder, Encoder};
use crate::error::DecodeError;

/// Magic at the start of the config file. Do not change: it identifies sbk repositories.
pub const CONFIG_MAGIC: &[u8; 8] = b"SBKREPO\0";
/// The newest repository format version this build writes and reads. It writes version 3 only
/// for a repository under Object Lock (the one thing version 3 adds), and version 2 otherwise,
/// so that an older sbk keeps reading every repository that does not need the new field.
pub const FORMAT_VERSION: u32 = 3;
/// The version of repositories without Object Lock.
pub const FORMAT_VERSION_PLAIN: u32 = 2;
/// Encoded size of a version 2 config in bytes (fixed).
pub const CONFIG_LEN: usize = 8 + 4 + 16 + 32 + 4 * 3 + 8 + 4 + 8 + 8 + 4 + 8 + 8 + 8 + 16 + 16;
/// Encoded size of a version 3 config: version 2's and the Object Lock field.
pub const CONFIG_LEN_LOCKED: usize = CONFIG_LEN + OBJECT_LOCK_LEN;
/// Size of the Object Lock field (duration, mode, reserved).
const OBJECT_LOCK_LEN: usize = 8 + 1 + 7;

/// Required feature bit 1: the repository is under S3 Object Lock (docs/format.md, "config").
/// A reader that does not know it must not write (it would write objects without retention)
/// nor delete (it would not know what retention keeps).
pub const FEATURE_OBJECT_LOCK: u64 = 1 << 1;

/// Required feature bits this build implements. A repository whose config sets a required bit
/// outside this mask is refused: reading it without the feature would be wrong (encrypted blobs
/// read as plain ones, say).
pub const KNOWN_REQUIRED_FEATURES: u64 = crate::crypto::FEATURE_ENCRYPTED | FEATURE_OBJECT_LOCK;

/// Longest Object Lock duration sbk accepts: 100 years, past which a date overflows nothing but
/// surely is a typo.
pub const MAX_OBJECT_LOCK_SECS: u64 = 100 * 366 * 86_400;

/// How the storage enforces retention (S3 Object Lock modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Nobody, not even the storage's root account, can delete a version before its date.
    Compliance,
    /// Identities with the `s3:BypassGovernanceRetention` permission can.
    Governance,
}

impl LockMode {
    /// The name S3 uses in its headers and documents.
    pub fn s3_name(self) -> &'static str {
        match self {
            LockMode::Compliance => "COMPLIANCE",
            LockMode::Governance => "GOVERNANCE",
        }
    }
}

/// A repository's Object Lock: every object of backup data is written with a retention date
/// at least `secs` ahead, and a snapshot is protected for `secs` after it was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectLock {
    /// The protection period, seconds (1..=[`MAX_OBJECT_LOCK_SECS`]).
    pub secs: u64,
    /// The mode retention is set in.
    pub mode: LockMode,
}

impl ObjectLock {
    /// The retention date of an object written at `now`: `now + secs`, rounded up to the next
    /// multiple of a tenth of `secs` (a generation, as Veeam groups them). Objects written or
    /// extended within one generation share one date, so a later backup that needs them
    /// covered finds most already are and extends the rest in one batch per generation.
    pub fn until(&self, now: i64) -> i64 {
        let step = (self.secs / 10).max(1) as i64;
        let at = now.saturating_add(self.secs as i64);
        at.div_euclid(step)
            .saturating_add(i64::from(at.rem_euclid(step) != 0))
            .saturating_mul(step)
    }
}

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
    /// With [`FEATURE_OBJECT_LOCK`] (version 3): the protection period and mode.
    pub object_lock: Option<ObjectLock>,
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

    /// How many leading bytes of the encoded config its authentication tag covers: everything
    /// before the tag.
    pub fn mac_covers(&self) -> usize {
        CONFIG_LEN - 32 + self.object_lock.map_or(0, |_| OBJECT_LOCK_LEN)
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
            .u64(self.features_optional);
        if let Some(lock) = &self.object_lock {
            e.u64(lock.secs)
                .bytes(&[match lock.mode {
                    LockMode::Compliance => 1,
                    LockMode::Governance => 2,
                }])
                .bytes(&[0; 7]);
        }
        e.bytes(&self.mac);
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
        let len = match version {
            FORMAT_VERSION_PLAIN => CONFIG_LEN,
            FORMAT_VERSION => CONFIG_LEN_LOCKED,
            _ => return Err(DecodeError::UnsupportedVersion(version)),
        };
        if bytes.len() != len {
            return Err(invalid(
                "config length",
                format!(
                    "{} bytes, expected {len} for version {version}",
                    bytes.len()
                ),
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
            object_lock: if version == FORMAT_VERSION {
                let secs = d.u64()?;
                let [mode, reserved @ ..]: [u8; 8] = d.array()?;
                if reserved != [0; 7] {
                    return Err(invalid("config reserved", "object lock bytes must be 0"));
                }
                let mode = match mode {
                    1 => LockMode::Compliance,
                    2 => LockMode::Governance,
                    m => return Err(invalid("object lock mode", format!("{m} is not 1 or 2"))),
                };
                Some(ObjectLock { secs, mode })
            } else {
                None
            },
            mac: d.array()?,
        };
        // The bit and the field come together: a version 3 config is one under Object Lock.
        if (c.features_required & FEATURE_OBJECT_LOCK != 0) != c.object_lock.is_some() {
            return Err(invalid(
                "features",
                "the object lock bit and the config version disagree",
            ));
        }
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
        if let Some(lock) = &self.object_lock {
            if !(1..=MAX_OBJECT_LOCK_SECS).contains(&lock.secs) {
                return Err(invalid(
                    "object lock duration",
                    format!("{} s is outside 1 s..100 years", lock.secs),
                ));
            }
        }
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
            version: FORMAT_VERSION_PLAIN,
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
            object_lock: None,
            mac: [0; 16],
        }
    }

    pub(crate) fn sample_locked() -> RepoConfig {
        RepoConfig {
            version: FORMAT_VERSION,
            features_required: FEATURE_OBJECT_LOCK,
            object_lock: Some(ObjectLock {
                secs: 30 * 86_400,
                mode: LockMode::Governance,
            }),
            ..sample()
        }
    }

    #[test]
    fn round_trip_and_fixed_length() {
        let c = sample();
        let bytes = c.encode();
        assert_eq!(bytes.len(), CONFIG_LEN);
        assert_eq!(RepoConfig::decode(&bytes).unwrap(), c);
        let c = sample_locked();
        let bytes = c.encode();
        assert_eq!(bytes.len(), CONFIG_LEN_LOCKED);
        assert_eq!(c.mac_covers(), 144);
        assert_eq!(RepoConfig::decode(&bytes).unwrap(), c);
    }

    #[test]
    fn retention_dates_come_in_generations() {
        let lock = ObjectLock {
            secs: 1000,
            mode: LockMode::Compliance,
        };
        assert_eq!(lock.until(0), 1000);
        assert_eq!(lock.until(1), 1100);
        assert_eq!(lock.until(99), 1100);
        assert_eq!(lock.until(100), 1100);
        let short = ObjectLock { secs: 5, ..lock };
        assert_eq!(short.until(7), 12);
        proptest!(|(now in 0i64..4_000_000_000, secs in 1u64..MAX_OBJECT_LOCK_SECS)| {
            let lock = ObjectLock { secs, ..lock };
            let until = lock.until(now);
            prop_assert!(until >= now + secs as i64);
            prop_assert!(until < now + secs as i64 + (secs / 10).max(1) as i64);
        });
    }

    #[test]
    fn the_lock_bit_and_field_come_together() {
        let mut c = sample_locked();
        c.features_required = 0;
        assert!(RepoConfig::decode(&c.encode()).is_err());
        let mut c = sample();
        c.features_required = FEATURE_OBJECT_LOCK;
        assert!(RepoConfig::decode(&c.encode()).is_err());
        // A version 2 config carrying the field is the wrong length for its version.
        let mut c = sample_locked();
        c.version = FORMAT_VERSION_PLAIN;
        assert!(RepoConfig::decode(&c.encode()).is_err());
        let mut c = sample_locked();
        c.object_lock = Some(ObjectLock {
            secs: 0,
            mode: LockMode::Compliance,
        });
        assert!(RepoConfig::decode(&c.encode()).is_err());
        let mut bytes = sample_locked().encode();
        bytes[136] = 3;
        assert!(RepoConfig::decode(&bytes).is_err());
    }

    #[test]
    fn newer_version_is_reported_as_such() {
        let mut bytes = sample().encode();
        bytes[8] = 4;
        assert_eq!(
            RepoConfig::decode(&bytes),
            Err(DecodeError::UnsupportedVersion(4))
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
        assert_eq!(KNOWN_REQUIRED_FEATURES & (1 << 5), 0);
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
            let mut bytes = sample_locked().encode();
            bytes[pos] ^= 1 << bit;
            prop_assert!(RepoConfig::decode(&bytes).is_err());
        }

        #[test]
        fn arbitrary_bytes_do_not_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = RepoConfig::decode(&bytes);
        }
    }
}
