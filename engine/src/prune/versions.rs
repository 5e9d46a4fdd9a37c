//! Under Object Lock, a delete only hides an object behind a delete marker: its versions stay,
//! and stay billed, until they are deleted by id, which the storage refuses before their
//! retention date. So prune ends by deleting, for good, every version of the objects that are
//! gone from the repository (forgotten snapshots, deleted packs, replaced index files, marks)
//! once its retention has passed, then the delete markers over nothing. Versions under an object
//! that is still there are left alone: they are what `--as-of` recovers from (a config or a
//! manifest overwritten by someone else).

use std::collections::HashSet;

use sbk_store::{Kind, ObjectVersion, Repository, StoreError};

use crate::error::Result;

/// What [`expire_versions`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expired {
    /// Versions deleted for good (or, in a dry run, that would be).
    pub versions_deleted: u64,
    /// Their bytes.
    pub bytes_freed: u64,
    /// Delete markers removed once nothing was left under them.
    pub markers_deleted: u64,
    /// Versions of gone objects still under retention: kept.
    pub versions_retained: u64,
    /// The earliest retention date among those (RFC 3339): the next prune after it frees more.
    pub retained_until: Option<String>,
    /// Versions the storage refused to delete although they carry no retention date.
    pub refused: u64,
    /// Why the first of those was refused.
    pub refusal: Option<String>,
}

/// The kinds whose gone objects' versions are expired. Not the config, never deleted; not the
/// keys: a key hidden by someone else must still open what `--as-of` recovers, and they are
/// few and small.
const KINDS: [Kind; 6] = [
    Kind::Pack,
    Kind::Index,
    Kind::Snapshot,
    Kind::Marks,
    Kind::Lock,
    Kind::Pin,
];

/// Deletes every version of gone objects whose retention has passed, and the markers left
/// over nothing; with `dry_run`, only counts (asking each version's retention). `indexed` are
/// the packs the index files still name: one of them hidden behind a delete marker was hidden
/// by someone else (prune removes a pack from the index first), and its data may still be
/// needed, so its versions stay. Nothing to do outside Object Lock.
pub(crate) fn expire_versions(
    repo: &Repository,
    dry_run: bool,
    indexed: &HashSet<String>,
) -> Result<Option<Expired>> {
    if repo.config().object_lock.is_none() {
        return Ok(None);
    }
    let Some(versions) = repo.backend().versions() else {
        return Ok(None);
    };
    let now = versions.storage_now();
    let mut out = Expired::default();
    for kind in KINDS {
        let listed = versions.versions(kind)?;
        for group in listed.chunk_by(|a, b| a.name == b.name) {
            let current = &group[0];
            // A live object keeps its versions; locks and pins are the exception, their old
            // versions are litter of refreshes.
            if kind == Kind::Pack && indexed.contains(&current.name) {
                continue;
            }
            let targets: &[ObjectVersion] = match current.delete_marker {
                true => group,
                false if matches!(kind, Kind::Lock | Kind::Pin) => &group[1..],
                false => continue,
            };
            let mut kept = 0;
            for v in targets.iter().filter(|v| !v.delete_marker) {
                let retained = if dry_run {
                    versions
                        .retention(kind, &v.name, Some(&v.version_id))?
                        .filter(|until| *until > now)
                        .map(crate::retention::rfc3339)
                } else {
                    match versions.delete_version(kind, &v.name, &v.version_id) {
                        Ok(()) => None,
                        Err(StoreError::Retained { until, .. }) => Some(until),
                        // Refused without a retention date (a legal hold, a policy): kept,
                        // and said, rather than failing the prune that did its work.
                        Err(StoreError::StorageDenied { detail, .. }) => {
                            out.refused += 1;
                            out.refusal.get_or_insert(detail);
                            kept += 1;
                            continue;
                        }
                        Err(e) => return Err(e.into()),
                    }
                };
                match retained {
                    Some(until) => {
                        kept += 1;
                        out.versions_retained += 1;
                        if out.retained_until.as_ref().is_none_or(|u| until < *u) {
                            out.retained_until = Some(until);
                        }
                    }
                    None => {
                        out.versions_deleted += 1;
                        out.bytes_freed += v.size;
                    }
                }
            }
            if kept > 0 {
                continue;
            }
            // Markers last: one removed while a version under it is left would bring that
            // version back as the current object.
            for m in targets.iter().filter(|v| v.delete_marker) {
                if !dry_run {
                    versions.delete_version(kind, &m.name, &m.version_id)?;
                }
                out.markers_deleted += 1;
            }
        }
    }
    Ok(Some(out))
}
