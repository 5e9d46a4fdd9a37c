//! The repository: a config, packs, index files, snapshot manifests and locks, all objects of a
//! [`Backend`] (docs/format.md, "objects"). Nothing here touches a path.

use std::sync::{Arc, OnceLock, RwLock};

use crate::backend::Backend;
use crate::config::RepoConfig;
use crate::crypto::Crypto;
use crate::error::Result;
use crate::index::Index;
use crate::key::KdfParams;
use crate::lock::{Lease, Lock, LockKind, LockTiming};

mod blobs;
mod index;
mod keys;
mod open;
mod packs;
mod pins;
mod snapshots;
#[cfg(test)]
mod tests;

pub use blobs::{PackGone, StoredBlob, READ_GAP_BYTES, READ_RUN_BYTES};
pub use index::FoundMarks;
use index::Marked;
pub use keys::{Credential, KeyInfo};

/// What `init` may choose; everything else is derived or random.
#[derive(Clone)]
pub struct InitOptions {
    /// Average chunk size (a power of two, 64 KiB..4 MiB).
    pub chunk_avg: u32,
    /// zstd level, 1..=19.
    pub zstd_level: u32,
    /// Packs are closed once they reach this size (1 MiB..1 GiB).
    pub pack_size: u64,
    /// Encrypt the repository with a key object for this password, or not at all (`None`).
    pub encryption: Option<(String, KdfParams)>,
    /// Cut and name chunks as another repository does (its average chunk size, gear seed and
    /// chunk-id key; `chunk_avg` is then ignored).
    pub chunker_from: Option<ChunkerSource>,
    /// Put the repository under S3 Object Lock (the backend must support and allow it).
    pub object_lock: Option<crate::config::ObjectLock>,
}

/// A repository's chunker parameters and chunk-id key, for another repository that should cut
/// and name chunks the same way (`init --copy-chunker-params-from`): the two then dedup against
/// each other, and a copy between them reads only the chunks the destination lacks. The key is
/// the source's secret (it reveals which chunks hold known data).
#[derive(Clone)]
pub struct ChunkerSource {
    /// Average chunk size.
    pub chunk_avg: u32,
    /// Gear seed.
    pub chunk_seed: u64,
    /// Key of the keyed BLAKE3 that names chunks.
    pub chunk_key: [u8; 32],
}

impl std::fmt::Debug for ChunkerSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("ChunkerSource")
            .field("chunk_avg", &self.chunk_avg)
            .finish()
    }
}

/// Default average chunk size. Chosen by measurement (docs/benchmarks.md, "Choosing the
/// defaults"): after a 2% change, 256 KiB chunks store 1.7x less new data than 1 MiB chunks, at
/// the same backup throughput and 250 KiB of metadata per 4 GiB snapshot.
pub const DEFAULT_CHUNK_AVG: u32 = 256 << 10;

/// Default zstd level: level 1 backs up 25-30% faster than level 3 for about 6% more stored
/// bytes on a disk image (docs/benchmarks.md).
pub const DEFAULT_ZSTD_LEVEL: u32 = 1;

/// Default pack size: large enough that a TiB is 32 Ki objects, small enough that a pack is
/// written in well under a second.
pub const DEFAULT_PACK_SIZE: u64 = 32 << 20;

impl std::fmt::Debug for InitOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("InitOptions")
            .field("chunk_avg", &self.chunk_avg)
            .field("zstd_level", &self.zstd_level)
            .field("pack_size", &self.pack_size)
            .field("encryption", &self.encryption.as_ref().map(|(_, kdf)| kdf))
            .field("chunker_from", &self.chunker_from)
            .field("object_lock", &self.object_lock)
            .finish()
    }
}

impl Default for InitOptions {
    /// Unencrypted: a library caller (a bench, a test) chooses encryption explicitly; the
    /// command line encrypts by default.
    fn default() -> Self {
        InitOptions {
            chunk_avg: DEFAULT_CHUNK_AVG,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            pack_size: DEFAULT_PACK_SIZE,
            encryption: None,
            chunker_from: None,
            object_lock: None,
        }
    }
}

/// How far past the storage's now a snapshot's time may be and still count as it is: clocks
/// differ by seconds, not by an hour (a forged or badly set one may differ by years).
pub const FUTURE_SLACK_SECS: i64 = 3600;

/// An open repository (unlocked, when it is encrypted).
pub struct Repository {
    backend: Arc<dyn Backend>,
    config: RepoConfig,
    config_hash: [u8; 32],
    index: OnceLock<Index>,
    /// The packs marked for deletion by prune when the index was last loaded (see
    /// [`Repository::dedup_hit`]).
    marked: RwLock<Marked>,
    lease: Arc<Lease>,
    crypto: Arc<Crypto>,
    chunk_key: [u8; 32],
    /// The key object that opened the repository.
    key_name: Option<String>,
    /// Where manifests are cached, once [`Repository::use_manifest_cache`] set it.
    manifest_cache: OnceLock<std::path::PathBuf>,
    /// Under Object Lock: the packs dedup hits found blobs in, each with the retention date
    /// this process last extended it to (0 before): a new snapshot needs them retained as long
    /// as it is protected (engine, protect.rs).
    reused_packs: std::sync::Mutex<std::collections::HashMap<crate::id::PackId, i64>>,
}

impl Drop for Repository {
    fn drop(&mut self) {
        // A copy of the secret chunk-id key when encrypted.
        zeroize::Zeroize::zeroize(&mut self.chunk_key);
    }
}

impl Repository {
    /// The backend, once the lease is known to hold: every repository operation goes through
    /// here, so an operation whose lock was lost stops at its next step.
    fn b(&self) -> Result<&dyn Backend> {
        self.lease.check()?;
        Ok(self.backend.as_ref())
    }

    /// The backend, shared (for locks).
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Where the repository is, for messages.
    pub fn location(&self) -> String {
        self.backend.location()
    }

    /// Takes a lock on the repository. If the lock is lost while held, every later operation
    /// of this repository fails with [`StoreError::LeaseLost`].
    pub fn lock(&self, kind: LockKind, purpose: &str, timing: LockTiming) -> Result<Lock> {
        self.lease.check()?;
        Lock::acquire(
            self.backend.clone(),
            self.lease.clone(),
            kind,
            purpose,
            timing,
        )
    }

    /// Fails once the lock this process holds is lost.
    pub fn check_lease(&self) -> Result<()> {
        self.lease.check()
    }

    /// Under Object Lock, when a snapshot's protection ends (seconds since the Unix epoch): its
    /// time and the repository's duration. Before then sbk neither forgets it nor lets its data
    /// go. A time more than an hour past `now` (the storage's clock) counts as `now` plus an
    /// hour: a snapshot forged with a far date must not be kept, nor keep its packs, for ever.
    pub fn protected_until(&self, manifest: &crate::Manifest, now: i64) -> Option<i64> {
        self.config.object_lock.map(|l| {
            manifest
                .time_ns
                .div_euclid(1_000_000_000)
                .min(now.saturating_add(FUTURE_SLACK_SECS))
                .saturating_add(l.secs as i64)
        })
    }

    /// The repository config.
    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    /// This repository's chunker parameters and chunk-id key, for another one that should cut
    /// and name chunks the same way.
    pub fn chunker_source(&self) -> ChunkerSource {
        ChunkerSource {
            chunk_avg: self.config.chunk_avg,
            chunk_seed: self.config.chunk_seed,
            chunk_key: self.chunk_key,
        }
    }
}
