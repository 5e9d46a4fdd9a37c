//! Object Lock: a snapshot is protected for the repository's duration after it was taken, and so
//! is everything it needs. Dedup lets a new snapshot refer to a pack written long ago, whose
//! retention may end before the new snapshot's protection does; so, before its manifest is
//! written, a snapshot's packs, and the config, keys and index files that make them readable,
//! have their retention extended where it might fall short (docs/design.md, "Immutability").
//!
//! What a snapshot needs, and how each is known to be covered until `until(time)` (the
//! generation-rounded end of its protection, `ObjectLock::until`), with times by the later of
//! the storage's and this host's clocks (the snapshot is dated by its host's):
//! - packs written by this run: written under retention `until(write time)`, no earlier than
//!   `until(time)` unless a generation ended between the run's start and the snapshot's: then
//!   they are all extended;
//! - packs a dedup hit found a blob in: recorded by the store with the date this process last
//!   extended them to, extended here when that is short;
//! - packs of the segments reused from the parent (trees and kept extents): the parent covered
//!   them to `until(parent time)` before its own manifest was written, which is enough while the
//!   two share a generation; otherwise every tree is walked and its packs extended;
//! - config, keys and index files: each extension of the config extends the keys and every
//!   index file with it, and later ones are written under later dates, so the config's date is
//!   a floor for all of them: one GetObjectRetention tells whether they need extending.

use rayon::prelude::*;
use sbk_store::{Extent, Kind, Manifest, PackId, Repository, StoreError, FUTURE_SLACK_SECS};

use crate::error::Result;

/// What [`protect`] extended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Protection {
    /// The date the extended objects are retained until (seconds since the Unix epoch).
    pub until: i64,
    /// Packs whose retention was extended.
    pub packs: u64,
    /// Config, key and index objects whose retention was extended.
    pub metadata: u64,
}

/// Seconds since the Unix epoch of a manifest's time.
fn secs(m: &Manifest) -> i64 {
    m.time_ns.div_euclid(1_000_000_000)
}

/// Keeps what `manifest` needs under retention until its protection ends, before it is
/// written. `parent` is the snapshot whose trees it reused, if any; `run_packs` are the packs
/// this run wrote, and `run_started` when it started (seconds, this host's clock): another
/// source of the run may have found blobs in them. Nothing to do (and `None`) outside Object
/// Lock.
pub(crate) fn protect(
    repo: &Repository,
    manifest: &Manifest,
    parent: Option<&Manifest>,
    run: (&[PackId], i64),
) -> Result<Option<Protection>> {
    let Some(lock) = repo.config().object_lock else {
        return Ok(None);
    };
    let backend = repo.backend();
    let Some(versions) = backend.versions() else {
        return Err(StoreError::NoVersions {
            location: backend.location(),
            what: "a repository under Object Lock".into(),
            why: "this storage keeps no versions".into(),
        }
        .into());
    };
    // Now by the later of the two clocks, as the objects are written (s3, versions.rs); a time
    // further ahead is not this host's (a copied snapshot forged with a far date), and must
    // not push retention there: it counts as now, as protected_until says.
    let now = versions.storage_now().max(sbk_store::unix_now());
    let time = secs(manifest).min(now + FUTURE_SLACK_SECS);
    let needed = lock.until(time);
    let until = lock.until(now.max(time));
    let mut packs = repo.reused_packs_below(needed);
    // The parent covered what it refers to until the end of its own generation, before its
    // manifest was written, if it is what it says: an earlier snapshot of this source.
    let parent_covers = parent.is_some_and(|p| secs(p) <= time && lock.until(secs(p)) >= needed);
    if parent.is_some() && !parent_covers {
        packs.extend(packs_of(repo, manifest)?);
    }
    // Written by this run under `until(write time)`: short only across a generation boundary
    // inside the run, when a source found blobs in a pack another wrote before it started.
    let (run_packs, run_started) = run;
    if lock.until(run_started) < needed {
        packs.extend_from_slice(run_packs);
    }
    packs.sort();
    packs.dedup();
    packs.par_iter().try_for_each(|p| {
        versions
            .extend_retention(Kind::Pack, &p.to_hex(), None, until)
            .map_err(crate::error::EngineError::from)
    })?;
    repo.packs_extended(&packs, until);
    let metadata = protect_metadata(repo, needed, until)?;
    Ok(Some(Protection {
        until,
        packs: packs.len() as u64,
        metadata,
    }))
}

/// Every pack holding a blob of `manifest`: its trees and their data chunks.
fn packs_of(repo: &Repository, manifest: &Manifest) -> Result<Vec<PackId>> {
    let index = repo.index()?;
    let mut packs = Vec::new();
    let pack_of = |id: &sbk_store::ChunkId| {
        index
            .get(id)
            .map(|e| e.pack)
            .ok_or(StoreError::BlobMissing(*id))
    };
    for (i, tree) in manifest.trees.iter().enumerate() {
        let start = i as u64 * manifest.segment_size;
        let len = manifest.segment_size.min(manifest.size - start);
        packs.push(pack_of(tree)?);
        for e in repo.load_tree(tree, len)? {
            if let Extent::Data { id, .. } = e {
                packs.push(pack_of(&id)?);
            }
        }
        // Many chunks share a pack: keep the list short as it grows.
        if packs.len() > 1 << 16 {
            packs.sort();
            packs.dedup();
        }
    }
    Ok(packs)
}

/// Extends the config, the keys and every index file to `until` when the config's retention
/// ends before `needed`; returns how many objects it extended.
fn protect_metadata(repo: &Repository, needed: i64, until: i64) -> Result<u64> {
    let backend = repo.backend();
    let versions = backend.versions().expect("checked by the caller");
    if versions
        .retention(Kind::Config, "config", None)?
        .is_some_and(|has| has >= needed)
    {
        return Ok(0);
    }
    let mut objects = Vec::new();
    for kind in [Kind::Key, Kind::Index] {
        objects.extend(backend.list(kind)?.into_iter().map(|o| (kind, o.name)));
    }
    objects.par_iter().try_for_each(|(kind, name)| {
        match versions.extend_retention(*kind, name, None, until) {
            // Replaced by a prune meanwhile, whose new index files carry a later date.
            Ok(()) | Err(StoreError::ObjectMissing { .. }) => Ok(()),
            Err(e) => Err(crate::error::EngineError::from(e)),
        }
    })?;
    // The config last: its date says the others were extended with it.
    versions.extend_retention(Kind::Config, "config", None, until)?;
    Ok(objects.len() as u64 + 1)
}
