//! Pins: snapshots a live lock keeps from prune, even once forgotten (a server's, or a
//! changed-block backup's parent).

use crate::backend::Kind;
use crate::error::{Result, StoreError};
use crate::id::SnapshotId;
use crate::lock::{FoundLock, Lock};
use crate::manifest::Manifest;

use super::Repository;

impl Repository {
    /// Pins snapshot `id` for the holder of `lock` (a server's pin lock, or a backup's lock for
    /// the parent whose trees it reuses), so that prune keeps its data even once it is
    /// forgotten: its manifest is copied to `pins/<lock>.<id>`, then the snapshot is
    /// checked to still exist. (A prune lists the snapshots before the pins: once the copy is
    /// written while the snapshot exists, every later prune sees one or the other. A snapshot
    /// that was gone by then may have lost its data already, and is refused.)
    pub fn pin_snapshot(&self, lock: &Lock, id: &SnapshotId) -> Result<()> {
        if lock.name().is_empty() {
            // The lock of a read-only view: nothing to pin, nothing can be written.
            return Ok(());
        }
        let bytes = self.manifest_bytes(id)?;
        let name = format!("{}.{}", lock.name(), id.to_hex());
        self.b()?.write_once(Kind::Pin, &name, &bytes)?;
        // The repository itself, never the local cache of manifests: the point is whether
        // the snapshot exists there now.
        if let Err(e) = self.stored_manifest_bytes(id) {
            let _ = self.b()?.delete(Kind::Pin, &name);
            return Err(e);
        }
        Ok(())
    }

    /// Removes the pin of snapshot `id` by the holder of `lock`.
    pub fn unpin_snapshot(&self, lock: &Lock, id: &SnapshotId) -> Result<()> {
        if lock.name().is_empty() {
            return Ok(());
        }
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
}
