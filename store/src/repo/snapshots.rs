//! Snapshot manifests: written last, listed, loaded and checked against their ids.

use crate::backend::Kind;
use crate::crypto::SealedFor;
use crate::error::{DecodeError, Result, StoreError};
use crate::id::SnapshotId;
use crate::index::CacheLocation;
use crate::manifest::Manifest;

use super::Repository;

impl Repository {
    /// Writes a manifest and returns its id. The caller must have made every blob it refers
    /// to durable and named in an index file first (docs/design.md, "write ordering").
    pub fn write_manifest(&self, manifest: &Manifest) -> Result<SnapshotId> {
        let bytes = self
            .crypto
            .seal(SealedFor::Object(Kind::Snapshot), &manifest.encode())
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

    /// Caches manifests in the cache folder of `location` from now on (`snapshots/` in the
    /// repository's folder): a manifest is immutable and named by the hash of its stored
    /// (sealed) bytes, so a cached copy is checked by hashing it, and listing 10^4 snapshots
    /// on object storage reads 10^4 local files instead of fetching 10^4 objects. A folder
    /// that cannot be made means no cache, silently: it is never needed.
    pub fn use_manifest_cache(&self, location: &CacheLocation) {
        if let CacheLocation::Dir(base) = location {
            let dir = base
                .join(crate::id::to_hex(&self.config.repo_id))
                .join("snapshots");
            if crate::index::make_private_dir(&dir).is_ok() {
                let _ = self.manifest_cache.set(dir);
            }
        }
    }

    /// A manifest object's bytes, as stored: from the manifest cache when it holds a copy that
    /// still hashes to `id`, else from the repository (and then cached).
    pub(super) fn manifest_bytes(&self, id: &SnapshotId) -> Result<Vec<u8>> {
        let name = id.to_hex();
        let cached = self.manifest_cache.get().map(|d| d.join(&name));
        if let Some(bytes) = cached.as_ref().and_then(|p| std::fs::read(p).ok()) {
            if blake3::hash(&bytes).as_bytes() == &id.0 {
                return Ok(bytes);
            }
        }
        let bytes = self.stored_manifest_bytes(id)?;
        if let Some(path) = cached.filter(|_| blake3::hash(&bytes).as_bytes() == &id.0) {
            // Only sound copies. Best effort, through a temporary name and a rename so that a reader never sees
            // half a copy (one that is torn anyway fails its hash and is fetched again); no
            // fsync, for the same reason.
            let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
            if std::fs::write(&tmp, &bytes).is_ok() && std::fs::rename(&tmp, &path).is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
        }
        Ok(bytes)
    }

    /// A manifest object's bytes as the repository holds them now (never the cache).
    pub(super) fn stored_manifest_bytes(&self, id: &SnapshotId) -> Result<Vec<u8>> {
        let name = id.to_hex();
        self.b()?.read(Kind::Snapshot, &name).map_err(|e| match e {
            StoreError::ObjectMissing { .. } => StoreError::SnapshotNotFound(name.clone()),
            e => e,
        })
    }

    /// Removes cached manifests of snapshots that are gone (forgotten here or elsewhere).
    fn trim_manifest_cache(&self, listed: &[SnapshotId]) {
        let Some(dir) = self.manifest_cache.get() else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let listed: std::collections::HashSet<String> =
            listed.iter().map(|id| id.to_hex()).collect();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            // Only copies (64 hex digits): another process's temporary files are its own.
            if name.len() == 64 && !listed.contains(&name) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Checks that manifest bytes (from object `name` of `kind`) hash to `id`, opens and
    /// decodes them.
    pub(super) fn decode_manifest(
        &self,
        id: &SnapshotId,
        bytes: &[u8],
        kind: Kind,
        name: &str,
    ) -> Result<Manifest> {
        let corrupt = |source| StoreError::Corrupt {
            path: kind.object_path(name),
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
            .open(SealedFor::Object(Kind::Snapshot), bytes)
            .map_err(corrupt)?;
        Manifest::decode(&plain).map_err(corrupt)
    }

    /// Every snapshot with its manifest (or the error that kept it from loading), oldest first.
    pub fn snapshots(&self) -> Result<Vec<(SnapshotId, Result<Manifest>)>> {
        self.snapshots_from(true)
    }

    /// [`Repository::snapshots`] as the repository holds them now, never from the local cache
    /// of manifests: what `verify` checks.
    pub fn snapshots_as_stored(&self) -> Result<Vec<(SnapshotId, Result<Manifest>)>> {
        self.snapshots_from(false)
    }

    fn snapshots_from(&self, cache: bool) -> Result<Vec<(SnapshotId, Result<Manifest>)>> {
        let ids = self.snapshot_ids()?;
        self.trim_manifest_cache(&ids);
        let load = |id: &SnapshotId| {
            if cache {
                self.load_manifest(id)
            } else {
                let bytes = self.stored_manifest_bytes(id)?;
                self.decode_manifest(id, &bytes, Kind::Snapshot, &id.to_hex())
            }
        };
        let mut all: Vec<_> = ids.into_iter().map(|id| (id, load(&id))).collect();
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
