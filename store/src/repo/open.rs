//! Creating and opening a repository: its config, checked and authenticated.

use std::sync::{Arc, OnceLock, RwLock};

use crate::backend::{Backend, Kind, Written};
use crate::clock::unix_now;
use crate::config::{RepoConfig, FEATURE_OBJECT_LOCK, FORMAT_VERSION, FORMAT_VERSION_PLAIN};
use crate::crypto::{Crypto, MasterKey, FEATURE_ENCRYPTED};
use crate::error::{DecodeError, Result, StoreError};
use crate::index::CacheLocation;
use crate::key::{Kdf, KeyObject};

use super::keys::{unlock, Credential};
use super::{InitOptions, Repository};

impl InitOptions {
    /// The average chunk size these options give, once they are checked.
    fn checked_chunk_avg(&self) -> Result<u32> {
        let avg = self
            .chunker_from
            .as_ref()
            .map_or(self.chunk_avg, |c| c.chunk_avg);
        if !avg.is_power_of_two() || !(64 << 10..=4 << 20).contains(&avg) {
            return Err(StoreError::InvalidParameter(format!(
                "chunk size {avg} must be a power of two from 64 KiB to 4 MiB"
            )));
        }
        if !(1 << 20..=1 << 30).contains(&self.pack_size) {
            return Err(StoreError::InvalidParameter(format!(
                "pack size {} must be from 1 MiB to 1 GiB",
                self.pack_size
            )));
        }
        Ok(avg)
    }
}

impl Repository {
    /// Creates a repository in an empty place.
    pub fn init(backend: &dyn Backend, opts: InitOptions) -> Result<RepoConfig> {
        // Parameters first: a bad one is the operator's typo, whatever the place holds.
        let avg = opts.checked_chunk_avg()?;
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
            version: match opts.object_lock {
                Some(_) => FORMAT_VERSION,
                None => FORMAT_VERSION_PLAIN,
            },
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
            // 16 MiB: the pipeline holds a few segments at once (threads + 2 buffers), so
            // their size is its memory. It holds a maximal chunk of any chunk size up to 1 MiB
            // four times over, so the cut forced at each segment start costs little dedup; 2 MiB
            // chunks get two maximal chunks a segment and 4 MiB chunks one (they used to get 32
            // and 64 MiB segments: a 4 MiB-chunk first backup peaked at 360 MiB). Disk images do not
            // shift their data, so a block that dedups is cut at the same place either way.
            segment_size: (16u64 << 20).max(u64::from(chunk_max)),
            pack_size: opts.pack_size,
            zstd_level: opts.zstd_level,
            created: unix_now(),
            features_required: if master.is_some() {
                FEATURE_ENCRYPTED
            } else {
                0
            } | if opts.object_lock.is_some() {
                FEATURE_OBJECT_LOCK
            } else {
                0
            },
            features_optional: 0,
            object_lock: opts.object_lock,
            mac: [0; 16],
        };
        config
            .validate()
            .map_err(|e| StoreError::InvalidParameter(e.to_string()))?;
        if let Some(lock) = opts.object_lock {
            // Before anything is written: the key and the config are protected too.
            retained_writes(backend, lock, "init --object-lock")?;
            let versions = backend.versions().expect("checked by retained_writes");
            if !versions.object_lock_enabled()? {
                return Err(StoreError::NoObjectLock {
                    bucket: backend.location(),
                });
            }
        }
        if let (Some(master), Some((password, kdf))) = (&master, &opts.encryption) {
            kdf.check()
                .map_err(|e| StoreError::InvalidParameter(e.to_string()))?;
            let crypto = Crypto::sealed(master.clone());
            config.mac = crypto
                .config_mac(&config.encode()[..config.mac_covers()])
                .expect("sealed crypto has a mac");
            backend.create()?;
            // The key object before the config: a crash in between leaves a directory that is
            // not a repository yet, which init refuses only because it is not empty.
            let key = KeyObject::wrap(
                master,
                password.as_bytes(),
                Kdf::Argon2id(*kdf),
                &config.repo_id,
                unix_now(),
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
        Self::read_config_once(backend).map_err(|e| match e {
            StoreError::NotARepository { .. }
            | StoreError::Corrupt { .. }
            | StoreError::UnsupportedFormat { .. }
            | StoreError::UnsupportedFeature { .. } => replaced_config(backend, e),
            e => e,
        })
    }

    fn read_config_once(backend: &dyn Backend) -> Result<(RepoConfig, Vec<u8>)> {
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
                supported: "formats 2 and 3 (3: under Object Lock)",
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
        Self::open_with(backend, &mut || password().map(Credential::Password))
    }

    /// [`Repository::open`] with a password or a key file: `credential` is asked for only when
    /// the repository is encrypted.
    pub fn open_with(
        backend: Arc<dyn Backend>,
        credential: &mut dyn FnMut() -> Result<Credential>,
    ) -> Result<Self> {
        let (config, bytes) = Self::read_config(backend.as_ref())?;
        if backend.read_only().is_none() {
            rewritten_config(backend.as_ref())?;
        }
        match config.object_lock {
            // A read-only view writes nothing, so it needs no retention to write with.
            Some(lock) if backend.read_only().is_none() => {
                retained_writes(backend.as_ref(), lock, "a repository under Object Lock")?
            }
            _ => {}
        }
        let encrypted = config.is_encrypted();
        let keys = backend.list(Kind::Key)?;
        let (crypto, chunk_key, key_name) = if encrypted {
            let (name, master) = unlock(backend.as_ref(), &keys, &config, &credential()?)?;
            let crypto = Crypto::sealed(master);
            // The config is authenticated by the master key: any changed byte is caught here.
            let mac = crypto
                .config_mac(&bytes[..config.mac_covers()])
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
            manifest_cache: OnceLock::new(),
            reused_packs: Default::default(),
        })
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

    /// True when the repository is encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.crypto.is_sealed()
    }
}

/// A config that is missing or unreadable on storage that keeps versions, where earlier ones
/// are: the repository was there and was damaged (a stolen mover deleted or overwrote it), and
/// `--as-of` reads it as it was. Anything else stays the error it was.
fn replaced_config(backend: &dyn Backend, e: StoreError) -> StoreError {
    let Some(versions) = backend.versions() else {
        return e;
    };
    let Ok(listed) = versions.versions(Kind::Config) else {
        return e;
    };
    let kept = listed.iter().filter(|v| !v.delete_marker).count();
    let what = match &e {
        StoreError::NotARepository { .. } => "was deleted".to_owned(),
        e => format!("cannot be read ({e})"),
    };
    match (&e, kept) {
        (_, 0) => e,
        // One version that does not decode is plain damage (or a newer sbk's repository).
        (StoreError::NotARepository { .. }, _) | (_, 2..) => StoreError::ConfigReplaced {
            location: backend.location(),
            what,
            versions: kept,
        },
        _ => e,
    }
}

/// Refuses a config that was written more than once, on storage that keeps versions: sbk
/// writes it once, at init, so a second version is someone else's, even with the same bytes (a
/// stolen mover's, rewriting it to drop Object Lock, or to put its own retention date on it).
/// A storage that does not let us list versions is not asked again: the check is a safeguard,
/// and reading needs no such permission.
fn rewritten_config(backend: &dyn Backend) -> Result<()> {
    let Some(versions) = backend.versions() else {
        return Ok(());
    };
    let Ok(listed) = versions.versions(Kind::Config) else {
        return Ok(());
    };
    let written = listed.iter().filter(|v| !v.delete_marker).count();
    if written > 1 {
        return Err(StoreError::ConfigReplaced {
            location: backend.location(),
            what: format!("was written {written} times (sbk writes it once)"),
            versions: written,
        });
    }
    Ok(())
}

/// Makes `backend` write every object of backup data under retention `lock`, or says why it
/// cannot: storage without versions (whoever is root on a host can undo any local protection),
/// or a bucket without Object Lock.
fn retained_writes(backend: &dyn Backend, lock: crate::ObjectLock, what: &str) -> Result<()> {
    match backend.versions() {
        Some(v) => {
            v.retain_writes(lock);
            Ok(())
        }
        None => Err(StoreError::NoVersions {
            location: backend.location(),
            what: what.into(),
            why: "a local repository cannot be protected from its own host (whoever is root there can undo any protection): use a bucket with Object Lock".into(),
        }),
    }
}

/// The sbk release that wrote each older repository format, for messages.
fn reader_of(version: u32) -> String {
    match version {
        1 => "; format 1 was written and is read by sbk 0.1".into(),
        v if v > FORMAT_VERSION => "; a newer sbk wrote it".into(),
        _ => String::new(),
    }
}
