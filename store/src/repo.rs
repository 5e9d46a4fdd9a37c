//! The repository: a config, packs, index files, snapshot manifests and locks, all objects of a
//! [`Backend`] (docs/format.md, "objects"). Nothing here touches a path.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, OnceLock, RwLock};

use crate::backend::{Backend, Kind, Written};
use crate::blob::{decode_blob_into, encode_blob, BlobKind, EncodedBlob};
use crate::config::{RepoConfig, FORMAT_VERSION};
use crate::crypto::{Context, Crypto, MasterKey, FEATURE_ENCRYPTED};
use crate::error::{DecodeError, Result, StoreError};
use crate::id::{random_bytes, to_hex, ChunkId, IndexId, PackId, SnapshotId};
use crate::index::file::IndexFile;
use crate::index::{read_index_file, CacheLocation, Index, IndexEntry, IndexReport};
use crate::key::{KdfParams, KeyObject};
use crate::lock::{FoundLock, Lease, Lock, LockKind, LockTiming};
use crate::manifest::{decode_tree, Extent, Manifest};
use crate::marks::Marks;
use crate::pack::{object_path, read_trailer, PackEntry, PackWriter};

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

/// The sbk release that wrote each older repository format, for messages.
fn reader_of(version: u32) -> String {
    match version {
        1 => "; format 1 was written and is read by sbk 0.1".into(),
        v if v > FORMAT_VERSION => "; a newer sbk wrote it".into(),
        _ => String::new(),
    }
}

impl std::fmt::Debug for InitOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("InitOptions")
            .field("chunk_avg", &self.chunk_avg)
            .field("zstd_level", &self.zstd_level)
            .field("pack_size", &self.pack_size)
            .field("encryption", &self.encryption.as_ref().map(|(_, kdf)| kdf))
            .field("chunker_from", &self.chunker_from)
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
        }
    }
}

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
}

impl Drop for Repository {
    fn drop(&mut self) {
        // A copy of the secret chunk-id key when encrypted.
        zeroize::Zeroize::zeroize(&mut self.chunk_key);
    }
}

/// The marked packs as this process knows them.
#[derive(Debug, Default)]
struct Marked {
    packs: HashSet<PackId>,
    /// A marks object that could not be read: which packs it marks is unknown.
    damaged: Option<String>,
}

/// A marks object as listed.
#[derive(Debug)]
pub struct FoundMarks {
    /// Its name.
    pub name: String,
    /// When the storage wrote it (its clock, seconds since the Unix epoch).
    pub modified: i64,
    /// Its contents, or why they could not be read.
    pub marks: Result<Marks>,
}

/// A key object as `key list` shows it.
#[derive(Debug, Clone)]
pub struct KeyInfo {
    /// The key object's name.
    pub name: String,
    /// Its contents, or why they could not be read.
    pub key: std::result::Result<KeyObject, DecodeError>,
    /// True for the key that opened the repository.
    pub current: bool,
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Repository {
    /// Creates a repository in an empty place.
    pub fn init(backend: &dyn Backend, opts: InitOptions) -> Result<RepoConfig> {
        // Parameters first: a bad one is the operator's typo, whatever the place holds.
        let avg = opts
            .chunker_from
            .as_ref()
            .map_or(opts.chunk_avg, |c| c.chunk_avg);
        if !avg.is_power_of_two() || !(64 << 10..=4 << 20).contains(&avg) {
            return Err(StoreError::InvalidParameter(format!(
                "chunk size {avg} must be a power of two from 64 KiB to 4 MiB"
            )));
        }
        if !(1 << 20..=1 << 30).contains(&opts.pack_size) {
            return Err(StoreError::InvalidParameter(format!(
                "pack size {} must be from 1 MiB to 1 GiB",
                opts.pack_size
            )));
        }
        let io = |e| StoreError::io(backend.location(), e);
        let chunk_max = avg * 4;
        let master = match &opts.encryption {
            Some(_) => {
                let mut m = MasterKey::random().map_err(io)?;
                if let Some(c) = &opts.chunker_from {
                    m.chunk = c.chunk_key;
                }
                Some(m)
            }
            None => None,
        };
        let mut config = RepoConfig {
            version: FORMAT_VERSION,
            repo_id: crate::id::random_bytes().map_err(io)?,
            // Encrypted, the chunk-id key is part of the master key, never stored in the clear.
            chunk_key: match (&master, &opts.chunker_from) {
                (Some(_), _) => [0; 32],
                (None, Some(c)) => c.chunk_key,
                (None, None) => crate::id::random_bytes().map_err(io)?,
            },
            chunk_min: avg / 4,
            chunk_avg: avg,
            chunk_max,
            chunk_seed: match &opts.chunker_from {
                Some(c) => c.chunk_seed,
                None => u64::from_le_bytes(crate::id::random_bytes().map_err(io)?),
            },
            zero_min: 64 << 10,
            // Segments hold several maximal chunks, so the cut forced at each segment start
            // costs little dedup; 16 MiB keeps the pipeline's buffers small.
            segment_size: (16u64 << 20).max(4 * u64::from(chunk_max)),
            pack_size: opts.pack_size,
            zstd_level: opts.zstd_level,
            created: now_unix(),
            features_required: if master.is_some() {
                FEATURE_ENCRYPTED
            } else {
                0
            },
            features_optional: 0,
            mac: [0; 16],
        };
        config
            .validate()
            .map_err(|e| StoreError::InvalidParameter(e.to_string()))?;
        if let (Some(master), Some((password, kdf))) = (&master, &opts.encryption) {
            kdf.check()
                .map_err(|e| StoreError::InvalidParameter(e.to_string()))?;
            let crypto = Crypto::sealed(master.clone());
            config.mac = crypto
                .config_mac(&config.encode()[..CONFIG_MAC_AT])
                .expect("sealed crypto has a mac");
            backend.create()?;
            // The key object before the config: a crash in between leaves a directory that is
            // not a repository yet, which init refuses only because it is not empty.
            let key = KeyObject::wrap(
                master,
                password.as_bytes(),
                *kdf,
                &config.repo_id,
                now_unix(),
            )
            .map_err(io)?;
            let name = crate::id::to_hex(&crate::id::random_bytes::<16>().map_err(io)?);
            backend.write_once(Kind::Key, &name, &key.encode())?;
        } else {
            backend.create()?;
        }
        // The config is written last: its presence is what makes the place a repository, so a
        // crash during init leaves a place that init can be told to use again.
        if backend.write_once(Kind::Config, "config", &config.encode())? == Written::AlreadyThere {
            return Err(StoreError::InitRefused {
                path: backend.location().into(),
                reason: "it already holds an sbk repository".into(),
            });
        }
        Ok(config)
    }

    /// Reads and checks the config of the repository at `backend`, without any key: enough
    /// to know that a repository is there, its format, and whether it is encrypted.
    pub fn read_config(backend: &dyn Backend) -> Result<(RepoConfig, Vec<u8>)> {
        let bytes = match backend.read(Kind::Config, "config") {
            Ok(b) => b,
            Err(StoreError::ObjectMissing { .. }) => {
                return Err(StoreError::NotARepository {
                    path: backend.location().into(),
                })
            }
            Err(e) => return Err(e),
        };
        let config = RepoConfig::decode(&bytes).map_err(|source| match source {
            DecodeError::UnsupportedVersion(found) => StoreError::UnsupportedFormat {
                location: backend.location(),
                what: "the repository",
                found,
                supported: FORMAT_VERSION,
                ours: env!("CARGO_PKG_VERSION"),
                hint: reader_of(found),
            },
            DecodeError::UnsupportedFeature(detail) => StoreError::UnsupportedFeature {
                location: backend.location(),
                detail,
                ours: env!("CARGO_PKG_VERSION"),
            },
            source => StoreError::Corrupt {
                path: "config".into(),
                what: "config",
                source,
            },
        })?;
        Ok((config, bytes))
    }

    /// Opens the repository: reads and checks its config and, when it is encrypted, unlocks
    /// it with the password `password` gives (asked only then). The index is not loaded (see
    /// [`Repository::load_index`]): listing snapshots or removing locks needs none.
    pub fn open(
        backend: Arc<dyn Backend>,
        password: &mut dyn FnMut() -> Result<String>,
    ) -> Result<Self> {
        let (config, bytes) = Self::read_config(backend.as_ref())?;
        let encrypted = config.features_required & FEATURE_ENCRYPTED != 0;
        let keys = backend.list(Kind::Key)?;
        let (crypto, chunk_key, key_name) = if encrypted {
            let password = password()?;
            let (name, master) = unlock(backend.as_ref(), &keys, &config, password.as_bytes())?;
            let crypto = Crypto::sealed(master);
            // The config is authenticated by the master key: any changed byte is caught here.
            let mac = crypto
                .config_mac(&bytes[..CONFIG_MAC_AT])
                .unwrap_or_default();
            // Compared without an early exit: no timing tells how much of a forged tag matched.
            let differ = mac
                .iter()
                .zip(&config.mac)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if differ != 0 {
                return Err(StoreError::Corrupt {
                    path: "config".into(),
                    what: "config",
                    source: DecodeError::AuthenticationFailed,
                });
            }
            let chunk_key = *crypto.chunk_key().expect("sealed crypto has a chunk key");
            (crypto, chunk_key, Some(name))
        } else {
            if !keys.is_empty() {
                // Key objects in an unencrypted repository: the config was replaced by one
                // that would make this sbk write plaintext into an encrypted repository.
                return Err(StoreError::Corrupt {
                    path: "config".into(),
                    what: "config",
                    source: DecodeError::Invalid {
                        field: "features",
                        detail: format!(
                            "says the repository is not encrypted, but it holds {} key objects",
                            keys.len()
                        ),
                    },
                });
            }
            (Crypto::Plain, config.chunk_key, None)
        };
        Ok(Repository {
            config_hash: *blake3::hash(&bytes).as_bytes(),
            backend,
            config,
            index: OnceLock::new(),
            marked: RwLock::default(),
            lease: Arc::default(),
            crypto: Arc::new(crypto),
            chunk_key,
            key_name,
        })
    }

    /// True when the repository is encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.crypto.is_sealed()
    }

    /// Every key object, with the one that opened the repository marked.
    pub fn keys(&self) -> Result<Vec<KeyInfo>> {
        let b = self.b()?;
        let mut out = Vec::new();
        for o in b.list(Kind::Key)? {
            let key = match b.read(Kind::Key, &o.name) {
                Ok(bytes) => KeyObject::decode(&bytes),
                Err(StoreError::ObjectMissing { .. }) => continue,
                Err(e) => return Err(e),
            };
            out.push(KeyInfo {
                current: self.key_name.as_deref() == Some(o.name.as_str()),
                name: o.name,
                key,
            });
        }
        Ok(out)
    }

    /// Adds a key object for `password`: the same master key, wrapped again.
    pub fn add_key(&self, password: &str, kdf: KdfParams) -> Result<String> {
        let Crypto::Sealed { key: master, .. } = self.crypto.as_ref() else {
            return Err(StoreError::NotEncrypted);
        };
        kdf.check()
            .map_err(|e| StoreError::InvalidParameter(e.to_string()))?;
        let io = |e| StoreError::io("key", e);
        let key = KeyObject::wrap(
            master,
            password.as_bytes(),
            kdf,
            &self.config.repo_id,
            now_unix(),
        )
        .map_err(io)?;
        let name = crate::id::to_hex(&crate::id::random_bytes::<16>().map_err(io)?);
        self.b()?.write_once(Kind::Key, &name, &key.encode())?;
        Ok(name)
    }

    /// Removes a key object. The last readable one, and the one that opened the repository,
    /// are refused (change its password instead).
    pub fn remove_key(&self, name: &str) -> Result<()> {
        let keys = self.keys()?;
        let Some(target) = keys.iter().find(|k| k.name == name) else {
            return Err(StoreError::ObjectMissing {
                kind: Kind::Key,
                name: name.to_owned(),
            });
        };
        if target.current {
            return Err(StoreError::KeyRefused(
                "it is the key this command was opened with; use `sbk key passwd` to change its password".into(),
            ));
        }
        if keys
            .iter()
            .filter(|k| k.key.is_ok() && k.name != name)
            .count()
            == 0
        {
            return Err(StoreError::KeyRefused(
                "it is the last readable key: without it nobody could open the repository".into(),
            ));
        }
        self.b()?.delete(Kind::Key, name)
    }

    /// Changes the password of the key that opened the repository: a new key object first,
    /// then the old one removed (a crash in between leaves both, never neither).
    pub fn change_password(&self, password: &str, kdf: KdfParams) -> Result<String> {
        let new = self.add_key(password, kdf)?;
        if let Some(old) = &self.key_name {
            self.b()?.delete(Kind::Key, old)?;
        }
        Ok(new)
    }

    /// Creates a repository in a local directory (a new or empty one, made mode 0700).
    pub fn init_local(path: &std::path::Path, opts: InitOptions) -> Result<RepoConfig> {
        Self::init(&crate::backend::LocalBackend::new(path), opts)
    }

    /// Opens the repository in a local directory (with `password` if it is encrypted) and loads
    /// its index through `cache`: what a program that only reads and writes one local
    /// repository needs.
    pub fn open_local(
        path: &std::path::Path,
        cache: &CacheLocation,
        password: Option<&str>,
    ) -> Result<Self> {
        let mut ask = || {
            password
                .map(str::to_owned)
                .ok_or_else(|| StoreError::NoPassword("the repository is encrypted".into()))
        };
        let repo = Self::open(Arc::new(crate::backend::LocalBackend::new(path)), &mut ask)?;
        repo.load_index(cache)?;
        Ok(repo)
    }

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

    /// Loads the index through the cache at `cache`, bringing it up to date with the index
    /// files. Call it after taking the lock: the cache is written here.
    pub fn load_index(&self, cache: &CacheLocation) -> Result<IndexReport> {
        if self.index.get().is_some() {
            return self.refresh_index();
        }
        // The marks before the index files (see `load_marks`).
        self.load_marks()?;
        let (index, report) = Index::open(
            self.b()?,
            cache,
            self.config.repo_id,
            self.config_hash,
            self.crypto.clone(),
        )?;
        let _ = self.index.set(index);
        Ok(report)
    }

    /// Brings the loaded index up to date with index files written since it was loaded.
    pub fn refresh_index(&self) -> Result<IndexReport> {
        self.load_marks()?;
        self.index()?.refresh(self.b()?)
    }

    /// Reads which packs prune has marked, adding them to those already known (a pack once
    /// marked stays avoided for the life of the process: a mark acted on since is no reason to
    /// dedup against what it named). After the lock is taken, and *before* the index files are
    /// listed: a mark this process reads is honoured; a prune that marks packs after our lock
    /// waits for it to go before it deletes them; and a mark acted on (and removed) before this
    /// listing had its packs dropped from the index files first, so the index files listed next
    /// do not name them.
    fn load_marks(&self) -> Result<()> {
        let found = self.list_marks()?;
        let mut marked = self.marked.write().expect("no thread panics holding this");
        marked.damaged = None;
        for f in found {
            match f.marks {
                Ok(m) => marked.packs.extend(m.packs.into_iter().map(|(p, _)| p)),
                Err(e) => marked.damaged = Some(e.to_string()),
            }
        }
        Ok(())
    }

    /// Whether a new snapshot may refer to blob `id` without storing it again: the index knows
    /// it, in a pack no prune has marked for deletion (a backup never dedups against a marked
    /// pack: a later prune may delete it, docs/design.md, "prune"). Fails when a marks object
    /// could not be read, since any pack might be marked.
    pub fn dedup_hit(&self, id: &ChunkId) -> Result<bool> {
        let Some(e) = self.index()?.get(id) else {
            return Ok(false);
        };
        let marked = self.marked.read().expect("no thread panics holding this");
        if let Some(why) = &marked.damaged {
            return Err(StoreError::Corrupt {
                path: Kind::Marks.dir().into(),
                what: "marks object",
                source: DecodeError::Invalid {
                    field: "marks",
                    detail: format!("{why}; run `sbk prune --exclusive` to clear it"),
                },
            });
        }
        Ok(!marked.packs.contains(&e.pack))
    }

    /// Whether `pack` was marked for deletion by a prune when the index was last loaded.
    pub fn is_marked(&self, pack: &PackId) -> bool {
        self.marked
            .read()
            .expect("no thread panics holding this")
            .packs
            .contains(pack)
    }

    /// Every marks object, with when the storage wrote it.
    pub fn list_marks(&self) -> Result<Vec<FoundMarks>> {
        let mut out = Vec::new();
        for o in self.b()?.list(Kind::Marks)? {
            let marks = match self.b()?.read(Kind::Marks, &o.name) {
                Ok(bytes) => Marks::decode(&bytes).map_err(|source| StoreError::Corrupt {
                    path: object_path(Kind::Marks, &o.name),
                    what: "marks object",
                    source,
                }),
                Err(StoreError::ObjectMissing { .. }) => continue, // acted on meanwhile
                Err(e) => return Err(e),
            };
            out.push(FoundMarks {
                name: o.name,
                modified: o.modified,
                marks,
            });
        }
        Ok(out)
    }

    /// Writes a marks object (durable before this returns); returns its name.
    pub fn write_marks(&self, marks: &Marks) -> Result<String> {
        let name = to_hex(&random_bytes::<16>().map_err(|e| StoreError::io(self.location(), e))?);
        self.b()?.write_once(Kind::Marks, &name, &marks.encode())?;
        Ok(name)
    }

    /// Removes a marks object (a durable delete).
    pub fn remove_marks(&self, name: &str) -> Result<()> {
        match self.b()?.delete(Kind::Marks, name) {
            Ok(()) | Err(StoreError::ObjectMissing { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The index (see [`Repository::load_index`]).
    pub fn index(&self) -> Result<&Index> {
        self.index.get().ok_or(StoreError::IndexNotLoaded)
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

    /// The id of a blob with these raw bytes: BLAKE3 keyed with the repository's key.
    pub fn blob_id(&self, raw: &[u8]) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.chunk_key, raw).as_bytes())
    }

    /// Looks a blob up in the index, failing when it is not there.
    pub fn locate(&self, id: &ChunkId) -> Result<IndexEntry> {
        self.index()?.get(id).ok_or(StoreError::BlobMissing(*id))
    }

    // ---- packs -------------------------------------------------------------------------------

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
    pub fn read_pack(&self, pack: PackId, offset: u64, buf: &mut [u8]) -> Result<()> {
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

    // ---- blobs -------------------------------------------------------------------------------

    /// Decodes the stored bytes of a blob into `out` (exactly `raw_len` long) and checks that
    /// they hash to the blob's id. Nothing unverified ever leaves this function. Sealed bytes
    /// are opened in place: `stored` holds plaintext afterwards.
    pub fn decode_verified(
        &self,
        pack: PackId,
        entry: &PackEntry,
        stored: &mut [u8],
        out: &mut [u8],
    ) -> Result<()> {
        let corrupt = |detail: String| StoreError::BlobCorrupt {
            id: entry.id,
            pack,
            detail,
        };
        let stored = self
            .crypto
            .open_in_place(Context::Blob(entry.kind, &entry.id), stored)
            .map_err(|e| corrupt(e.to_string()))?;
        decode_blob_into(entry.compression, stored, out).map_err(|e| corrupt(e.to_string()))?;
        let got = self.blob_id(out);
        if got != entry.id {
            return Err(corrupt(format!("contents hash to {got}")));
        }
        Ok(())
    }

    /// Checks the blob header at the start of `bytes` (read from `pack`) against `entry`, and
    /// that it is sealed exactly when the repository is encrypted.
    pub fn check_blob_header(
        &self,
        bytes: &[u8],
        entry: &PackEntry,
        pack: PackId,
    ) -> Result<crate::blob::BlobHeader> {
        crate::pack::check_blob_header(bytes, entry, pack, self.crypto.is_sealed())
    }

    /// The stored bytes of a blob read from `pack` with its header, once the header checks.
    pub fn split_blob<'a>(
        &self,
        bytes: &'a [u8],
        entry: &PackEntry,
        pack: PackId,
    ) -> Result<&'a [u8]> {
        crate::pack::split_blob(bytes, entry, pack, self.crypto.is_sealed())
    }

    /// [`Repository::split_blob`], mutable (for [`Repository::decode_verified`]).
    pub fn split_blob_mut<'a>(
        &self,
        bytes: &'a mut [u8],
        entry: &PackEntry,
        pack: PackId,
    ) -> Result<&'a mut [u8]> {
        crate::pack::split_blob_mut(bytes, entry, pack, self.crypto.is_sealed())
    }

    /// A blob of these raw bytes, ready for a pack: compressed at the repository's level
    /// (kept raw when that does not help) and, encrypted, sealed to its kind and id.
    pub fn encode_blob(&self, id: ChunkId, kind: BlobKind, raw: &[u8]) -> Result<EncodedBlob> {
        let io = |e| StoreError::io("blob", e);
        let mut blob = encode_blob(id, kind, raw, self.config.zstd_level).map_err(io)?;
        if self.crypto.is_sealed() {
            blob.data = self
                .crypto
                .seal(Context::Blob(kind, &id), &blob.data)
                .map_err(io)?;
            blob.header.stored_len = blob.data.len() as u32;
            blob.header.sealed = true;
        }
        Ok(blob)
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
        match self.read_blob_once(id, kind, stored, out) {
            // A prune beside us deleted the pack after moving the blob to another one (a pack
            // is deleted only once the index files name its used blobs elsewhere), or the blob
            // is newer than the loaded index: the index, refreshed, knows where (docs/design.md,
            // "prune"). A blob a snapshot refers to moves; it never goes.
            Err(StoreError::PackMissing { .. } | StoreError::BlobMissing(_)) => {
                self.refresh_index()?;
                self.read_blob_once(id, kind, stored, out)
            }
            r => r,
        }
    }

    fn read_blob_once(
        &self,
        id: &ChunkId,
        kind: BlobKind,
        stored: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<PackId> {
        let IndexEntry { pack, entry } = self.locate(id)?;
        if entry.kind != kind {
            return Err(StoreError::BlobCorrupt {
                id: *id,
                pack,
                detail: format!("is a {:?} blob, expected {kind:?}", entry.kind),
            });
        }
        stored.resize(crate::blob::BLOB_HEADER_LEN + entry.stored_len as usize, 0);
        self.read_pack(pack, entry.offset, stored)?;
        let data = self.split_blob_mut(stored, &entry, pack)?;
        out.resize(entry.raw_len as usize, 0);
        self.decode_verified(pack, &entry, data, out)?;
        Ok(pack)
    }

    /// Reads a segment tree and decodes its extents, which must cover `segment_len` bytes.
    pub fn load_tree(&self, id: &ChunkId, segment_len: u64) -> Result<Vec<Extent>> {
        let (pack, raw) = self.read_blob_in(id, BlobKind::Tree)?;
        decode_tree(&raw, segment_len).map_err(|e| StoreError::BlobCorrupt {
            id: *id,
            pack,
            detail: format!("segment tree does not decode: {e}"),
        })
    }

    // ---- index files -------------------------------------------------------------------------

    /// Writes an index file naming `packs` (which must be durable already) and adds it to the
    /// loaded index. Returns its id.
    pub fn write_index_file(&self, packs: Vec<(PackId, Vec<PackEntry>)>) -> Result<IndexId> {
        let file = IndexFile {
            packs,
            extensions: Vec::new(),
        };
        let bytes = self
            .crypto
            .seal(Context::Object(Kind::Index), &file.encode())
            .map_err(|e| StoreError::io("index file", e))?;
        let id = IndexFile::id_of(&bytes);
        self.b()?.write_once(Kind::Index, &id.to_hex(), &bytes)?;
        if let Some(index) = self.index.get() {
            index.add(id, &file);
        }
        Ok(id)
    }

    /// Every index file in the repository.
    pub fn index_files(&self) -> Result<BTreeSet<IndexId>> {
        crate::backend::list_ids(self.b()?, Kind::Index)
    }

    /// Reads one index file.
    pub fn read_index_file(&self, id: &IndexId) -> Result<IndexFile> {
        read_index_file(self.b()?, id, &self.crypto)
    }

    /// Removes an index file (prune and repair, under an exclusive lock, once the index files
    /// that replace it are written).
    pub fn remove_index_file(&self, id: &IndexId) -> Result<()> {
        self.b()?.delete(Kind::Index, &id.to_hex())
    }

    // ---- snapshots ---------------------------------------------------------------------------

    /// Writes a manifest and returns its id. The caller must have made every blob it refers
    /// to durable and named in an index file first (docs/design.md, "write ordering").
    pub fn write_manifest(&self, manifest: &Manifest) -> Result<SnapshotId> {
        let bytes = self
            .crypto
            .seal(Context::Object(Kind::Snapshot), &manifest.encode())
            .map_err(|e| StoreError::io("manifest", e))?;
        let id = SnapshotId(*blake3::hash(&bytes).as_bytes());
        self.b()?.write_once(Kind::Snapshot, &id.to_hex(), &bytes)?;
        Ok(id)
    }

    /// Removes a snapshot's manifest (its data stays until prune).
    pub fn remove_snapshot(&self, id: &SnapshotId) -> Result<()> {
        self.b()?
            .delete(Kind::Snapshot, &id.to_hex())
            .map_err(|e| match e {
                StoreError::ObjectMissing { .. } => StoreError::SnapshotNotFound(id.to_hex()),
                e => e,
            })
    }

    /// Ids of every snapshot, sorted.
    pub fn snapshot_ids(&self) -> Result<Vec<SnapshotId>> {
        crate::backend::list_ids(self.b()?, Kind::Snapshot)
    }

    /// Loads a manifest, checking that its bytes still hash to its id.
    pub fn load_manifest(&self, id: &SnapshotId) -> Result<Manifest> {
        let bytes = self.manifest_bytes(id)?;
        self.decode_manifest(id, &bytes, Kind::Snapshot, &id.to_hex())
    }

    /// A manifest object's bytes, as stored.
    fn manifest_bytes(&self, id: &SnapshotId) -> Result<Vec<u8>> {
        let name = id.to_hex();
        self.b()?.read(Kind::Snapshot, &name).map_err(|e| match e {
            StoreError::ObjectMissing { .. } => StoreError::SnapshotNotFound(name.clone()),
            e => e,
        })
    }

    /// Checks that manifest bytes (from object `name` of `kind`) hash to `id`, opens and
    /// decodes them.
    fn decode_manifest(
        &self,
        id: &SnapshotId,
        bytes: &[u8],
        kind: Kind,
        name: &str,
    ) -> Result<Manifest> {
        let corrupt = |source| StoreError::Corrupt {
            path: object_path(kind, name),
            what: "snapshot manifest",
            source,
        };
        let name = id.to_hex();
        let got = blake3::hash(bytes);
        if got.as_bytes() != &id.0 {
            return Err(corrupt(DecodeError::ChecksumMismatch {
                got: got.to_hex().to_string(),
                expected: name,
            }));
        }
        let plain = self
            .crypto
            .open(Context::Object(Kind::Snapshot), bytes)
            .map_err(corrupt)?;
        Manifest::decode(&plain).map_err(corrupt)
    }

    /// Pins snapshot `id` for the holder of `lock` (a server's pin lock, or a backup's lock for
    /// the parent whose trees it reuses), so that prune keeps its data even once it is
    /// forgotten: its manifest is copied to `pins/<lock>.<id>`, then the snapshot is
    /// checked to still exist. (A prune lists the snapshots before the pins: once the copy is
    /// written while the snapshot exists, every later prune sees one or the other. A snapshot
    /// that was gone by then may have lost its data already, and is refused.)
    pub fn pin_snapshot(&self, lock: &Lock, id: &SnapshotId) -> Result<()> {
        let bytes = self.manifest_bytes(id)?;
        let name = format!("{}.{}", lock.name(), id.to_hex());
        self.b()?.write_once(Kind::Pin, &name, &bytes)?;
        if let Err(e) = self.manifest_bytes(id) {
            let _ = self.b()?.delete(Kind::Pin, &name);
            return Err(e);
        }
        Ok(())
    }

    /// Removes the pin of snapshot `id` by the holder of `lock`.
    pub fn unpin_snapshot(&self, lock: &Lock, id: &SnapshotId) -> Result<()> {
        match self
            .b()?
            .delete(Kind::Pin, &format!("{}.{}", lock.name(), id.to_hex()))
        {
            Ok(()) | Err(StoreError::ObjectMissing { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The snapshots that live locks pin, with their manifests (from the pins' copies: a
    /// pinned snapshot may have been forgotten). Locks are judged at `storage_now`, the
    /// storage's time (see [`crate::FoundLock::live`]).
    pub fn pinned_snapshots(&self, storage_now: i64) -> Result<Vec<(SnapshotId, Manifest)>> {
        let live = self.live_lock_names(storage_now)?;
        let mut out = Vec::new();
        for pin in self.b()?.list(Kind::Pin)? {
            let Some((owner, snap)) = pin.name.split_once('.') else {
                continue;
            };
            if !live.iter().any(|l| l == owner) {
                continue;
            }
            let Ok(id) = snap.parse::<SnapshotId>() else {
                continue;
            };
            let bytes = match self.b()?.read(Kind::Pin, &pin.name) {
                Ok(b) => b,
                Err(StoreError::ObjectMissing { .. }) => continue, // unpinned meanwhile
                Err(e) => return Err(e),
            };
            out.push((id, self.decode_manifest(&id, &bytes, Kind::Pin, &pin.name)?));
        }
        Ok(out)
    }

    /// Removes the pins of locks that are gone or stale at `storage_now`; returns how many.
    pub fn remove_stale_pins(&self, storage_now: i64) -> Result<usize> {
        // The pins first, then the locks: a server's lock is written before its pins, so every
        // pin listed here has its lock in the listing after, and a server that started meanwhile
        // does not lose a fresh pin.
        let pins = self.b()?.list(Kind::Pin)?;
        let live = self.live_lock_names(storage_now)?;
        let mut removed = 0;
        for pin in pins {
            let owner = crate::lock::pin_owner(&pin.name);
            if !owner.is_some_and(|o| live.iter().any(|l| l == o)) {
                self.b()?.delete(Kind::Pin, &pin.name)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The locks that are live at `storage_now` ([`crate::FoundLock::live`]).
    pub fn live_locks(&self, storage_now: i64) -> Result<Vec<FoundLock>> {
        let holder = crate::lock::holder_id();
        Ok(crate::lock::list_locks(self.b()?)?
            .into_iter()
            .filter(|l| l.live(&holder, storage_now))
            .collect())
    }

    /// Names of the locks that are live at `storage_now`.
    fn live_lock_names(&self, storage_now: i64) -> Result<Vec<String>> {
        Ok(self
            .live_locks(storage_now)?
            .into_iter()
            .map(|l| l.name)
            .collect())
    }

    /// Every snapshot with its manifest (or the error that kept it from loading), oldest first.
    pub fn snapshots(&self) -> Result<Vec<(SnapshotId, Result<Manifest>)>> {
        let mut all: Vec<_> = self
            .snapshot_ids()?
            .into_iter()
            .map(|id| (id, self.load_manifest(&id)))
            .collect();
        all.sort_by_key(|(id, m)| (m.as_ref().map(|m| m.time_ns).unwrap_or(i64::MIN), *id));
        Ok(all)
    }

    /// Resolves `latest`, a full id or a unique prefix of one.
    pub fn resolve_snapshot(&self, spec: &str) -> Result<SnapshotId> {
        if spec == "latest" {
            return self
                .snapshots()?
                .into_iter()
                .rev()
                .find(|(_, m)| m.is_ok())
                .map(|(id, _)| id)
                .ok_or_else(|| StoreError::SnapshotNotFound(spec.to_owned()));
        }
        let spec_lc = spec.to_ascii_lowercase();
        if spec_lc.is_empty() || !spec_lc.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(StoreError::SnapshotNotFound(spec.to_owned()));
        }
        let matches: Vec<_> = self
            .snapshot_ids()?
            .into_iter()
            .filter(|id| id.to_hex().starts_with(&spec_lc))
            .collect();
        match matches.len() {
            0 => Err(StoreError::SnapshotNotFound(spec.to_owned())),
            1 => Ok(matches[0]),
            count => Err(StoreError::AmbiguousSnapshot {
                prefix: spec.to_owned(),
                count,
            }),
        }
    }
}

/// A pack read's error, said of the pack: missing is `PackMissing`, too short is a truncated
/// (corrupt) pack.
fn pack_error(pack: PackId, e: StoreError) -> StoreError {
    match e {
        StoreError::ObjectMissing { .. } => StoreError::PackMissing {
            pack,
            path: object_path(Kind::Pack, &pack.to_hex()),
        },
        StoreError::ShortObject { needed, size, .. } => StoreError::Corrupt {
            path: object_path(Kind::Pack, &pack.to_hex()),
            what: "pack",
            source: DecodeError::Truncated {
                needed: needed as usize,
                available: size as usize,
            },
        },
        e => e,
    }
}

/// The config's bytes its authentication tag covers: everything before the tag.
const CONFIG_MAC_AT: usize = 128;

/// Tries `password` on every key object: the master key of the first that opens, and its name.
fn unlock(
    backend: &dyn Backend,
    keys: &[crate::backend::ObjectInfo],
    config: &RepoConfig,
    password: &[u8],
) -> Result<(String, MasterKey)> {
    let mut damaged = Vec::new();
    let mut tried = 0;
    for o in keys {
        let key = match backend.read(Kind::Key, &o.name) {
            Ok(bytes) => KeyObject::decode(&bytes),
            Err(StoreError::ObjectMissing { .. }) => continue,
            Err(e) => return Err(e),
        };
        match key {
            Ok(k) => {
                tried += 1;
                let master = k.unwrap_with(password, &config.repo_id).map_err(|source| {
                    StoreError::Corrupt {
                        path: crate::pack::object_path(Kind::Key, &o.name),
                        what: "key object",
                        source,
                    }
                })?;
                if let Some(m) = master {
                    return Ok((o.name.clone(), m));
                }
            }
            Err(source) => damaged.push(StoreError::Corrupt {
                path: crate::pack::object_path(Kind::Key, &o.name),
                what: "key object",
                source,
            }),
        }
    }
    if tried == 0 {
        // No key object could even be read: damage, not a wrong password.
        return Err(damaged.into_iter().next().unwrap_or(StoreError::Corrupt {
            path: "keys".into(),
            what: "key objects",
            source: DecodeError::Invalid {
                field: "keys",
                detail: "the repository is encrypted but holds no key object".into(),
            },
        }));
    }
    Err(StoreError::WrongPassword {
        tried,
        damaged: damaged.len(),
    })
}
