//! A repository as it was at a past time (`--as-of`), read through the object versions of
//! storage that keeps them ([`Versions`]): for each name, the newest version the storage wrote
//! at or before that time, unless that is a delete marker. Whatever was written, overwritten or
//! deleted later (by a stolen mover, say) is not seen. Nothing is ever written through it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::{Backend, Kind, ObjectInfo, ObjectVersion, Staged, Versions, Written};
use crate::error::{Result, StoreError};

/// The version of each object that was current at the time, by name.
type View = BTreeMap<String, ObjectVersion>;

/// A read-only view of a repository at a past time.
pub struct AsOfBackend {
    inner: Arc<dyn Backend>,
    /// The time, seconds since the Unix epoch, by the storage's clock (compared with each
    /// version's LastModified, at one-second resolution: a version written in the second of
    /// `at` counts as written before it).
    at: i64,
    /// `at` as the operator gave it, for messages.
    label: String,
    /// Each kind's view, listed on first use.
    views: Mutex<BTreeMap<Kind, Arc<View>>>,
}

impl AsOfBackend {
    /// The repository at `inner` as it was at `at` (`label` names it in messages). Storage
    /// that keeps no versions (a local directory) cannot be read so.
    pub fn new(inner: Arc<dyn Backend>, at: i64, label: &str) -> Result<AsOfBackend> {
        if inner.versions().is_none() {
            return Err(StoreError::NoVersions {
                location: inner.location(),
                what: format!("reading the repository as of {label}"),
                why: "this storage keeps only the current objects".into(),
            });
        }
        Ok(AsOfBackend {
            inner,
            at,
            label: label.to_owned(),
            views: Mutex::default(),
        })
    }

    fn versions(&self) -> &dyn Versions {
        self.inner.versions().expect("checked in new")
    }

    fn view(&self, kind: Kind) -> Result<Arc<View>> {
        if let Some(v) = self
            .views
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&kind)
        {
            return Ok(v.clone());
        }
        let versions = self.versions();
        // The fallback's candidates must carry retention: an object someone else wrote
        // after the time, without it, is not taken for one of sbk's whose date moved.
        let retained = |v: &ObjectVersion| {
            matches!(
                versions.retention(kind, &v.name, Some(&v.version_id)),
                Ok(Some(_))
            )
        };
        let view = Arc::new(view_at(
            versions.versions(kind)?,
            self.at,
            extended(kind).then_some(&retained as &dyn Fn(&ObjectVersion) -> bool),
        ));
        self.views
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(kind, view.clone());
        Ok(view)
    }

    fn version(&self, kind: Kind, name: &str) -> Result<ObjectVersion> {
        self.view(kind)?
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError::ObjectMissing {
                kind,
                name: name.to_owned(),
            })
    }

    fn refuse<T>(&self, kind: Kind, name: &str) -> Result<T> {
        Err(StoreError::ReadOnly {
            location: self.inner.location(),
            as_of: self.label.clone(),
            kind,
            name: name.to_owned(),
        })
    }
}

/// Whether sbk extends the retention of objects of `kind` after writing them (engine,
/// protect.rs). Some storage (SeaweedFS 4.48) moves a version's LastModified when its
/// retention changes, so such a version may look written after a time it existed at.
fn extended(kind: Kind) -> bool {
    matches!(kind, Kind::Config | Kind::Key | Kind::Index | Kind::Pack)
}

/// The versions current at `at`: for each name the newest version written at or before it,
/// unless that is a delete marker. `versions` lists each name's versions newest first; a
/// version of the same second as a later one in the list is older.
///
/// With `fallback`, a name whose every version looks written after `at` is taken at its oldest
/// version when that is no delete marker and `fallback` accepts it (it carries retention): sbk
/// writes these names once and never replaces them, so the oldest version holds its bytes, and
/// its date may have moved with a retention extension. At worst an object written after `at`
/// joins the view (a forged index file could then make a chunk fail its check: never wrong
/// bytes).
fn view_at(
    versions: Vec<ObjectVersion>,
    at: i64,
    fallback: Option<&dyn Fn(&ObjectVersion) -> bool>,
) -> View {
    let extended = fallback.is_some();
    let mut view = View::new();
    let mut decided = std::collections::BTreeSet::new();
    let mut oldest: BTreeMap<String, ObjectVersion> = BTreeMap::new();
    for v in versions {
        if v.modified > at || decided.contains(&v.name) {
            if extended && !decided.contains(&v.name) {
                oldest.insert(v.name.clone(), v);
            }
            continue;
        }
        decided.insert(v.name.clone());
        oldest.remove(&v.name);
        if !v.delete_marker {
            view.insert(v.name.clone(), v);
        }
    }
    if let Some(accept) = fallback {
        for (name, v) in oldest {
            if !v.delete_marker && accept(&v) {
                view.insert(name, v);
            }
        }
    }
    view
}

impl Backend for AsOfBackend {
    fn location(&self) -> String {
        format!("{} as of {}", self.inner.location(), self.label)
    }

    fn create(&self) -> Result<()> {
        self.refuse(Kind::Config, "config")
    }

    fn list(&self, kind: Kind) -> Result<Vec<ObjectInfo>> {
        Ok(self
            .view(kind)?
            .values()
            .map(|v| ObjectInfo {
                name: v.name.clone(),
                size: v.size,
                modified: v.modified,
            })
            .collect())
    }

    fn read(&self, kind: Kind, name: &str) -> Result<Vec<u8>> {
        let v = self.version(kind, name)?;
        self.versions().read_version(kind, name, &v.version_id)
    }

    fn read_at(&self, kind: Kind, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let v = self.version(kind, name)?;
        let end = offset + buf.len() as u64;
        if end > v.size {
            return Err(StoreError::ShortObject {
                kind,
                name: name.to_owned(),
                needed: end,
                size: v.size,
            });
        }
        self.versions()
            .read_version_at(kind, name, &v.version_id, offset, buf)
    }

    fn size(&self, kind: Kind, name: &str) -> Result<u64> {
        Ok(self.version(kind, name)?.size)
    }

    fn write_once(&self, kind: Kind, name: &str, _: &[u8]) -> Result<Written> {
        self.refuse(kind, name)
    }

    fn stage(&self, kind: Kind, name: &str) -> Result<Box<dyn Staged>> {
        self.refuse(kind, name)
    }

    fn replace(&self, kind: Kind, name: &str, _: &[u8]) -> Result<()> {
        self.refuse(kind, name)
    }

    fn delete(&self, kind: Kind, name: &str) -> Result<()> {
        self.refuse(kind, name)
    }

    fn remove_leftovers(&self, _: i64) -> Result<u64> {
        self.refuse(Kind::Pack, "(leftovers)")
    }

    fn read_only(&self) -> Option<String> {
        Some(format!("read as of {}", self.label))
    }

    fn reads_are_requests(&self) -> bool {
        self.inner.reads_are_requests()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(name: &str, modified: i64, id: &str, delete_marker: bool) -> ObjectVersion {
        ObjectVersion {
            name: name.into(),
            modified,
            version_id: id.into(),
            size: if delete_marker { 0 } else { 10 },
            delete_marker,
            latest: false,
        }
    }

    #[test]
    fn the_view_holds_what_was_current_then() {
        let versions = vec![
            // Overwritten at 20 (garbage), written at 10.
            v("config", 20, "c2", false),
            v("config", 10, "c1", false),
            // Deleted at 15.
            v("gone", 15, "g2", true),
            v("gone", 5, "g1", false),
            // Deleted at 25, after the time: still there.
            v("later", 25, "l2", true),
            v("later", 12, "l1", false),
            // Written after the time only.
            v("new", 30, "n1", false),
            // Two versions in the same second: the first listed is the newer.
            v("tie", 18, "t2", false),
            v("tie", 18, "t1", false),
        ];
        let view = view_at(versions.clone(), 18, None);
        let ids: Vec<(&str, &str)> = view
            .values()
            .map(|v| (v.name.as_str(), v.version_id.as_str()))
            .collect();
        assert_eq!(ids, vec![("config", "c1"), ("later", "l1"), ("tie", "t2")]);
        // Where dates move with retention: a name seen only after the time is taken at its
        // oldest version, unless that is a delete marker.
        let versions = vec![
            v("pack", 40, "p2", true),
            v("pack", 30, "p1", false),
            v("marked", 30, "m2", false),
            v("marked", 29, "m1", true),
            v("config", 20, "c2", false),
            v("config", 10, "c1", false),
            // Written after the time by someone else, without retention.
            v("forged", 30, "f1", false),
        ];
        let retained = |v: &ObjectVersion| v.version_id != "f1";
        let view = view_at(versions, 18, Some(&retained));
        let ids: Vec<(&str, &str)> = view
            .values()
            .map(|v| (v.name.as_str(), v.version_id.as_str()))
            .collect();
        assert_eq!(ids, vec![("config", "c1"), ("pack", "p1")]);
    }

    #[test]
    fn storage_without_versions_is_refused() {
        let mem: Arc<dyn Backend> = Arc::new(crate::backend::MemBackend::new());
        assert!(matches!(
            AsOfBackend::new(mem, 0, "yesterday"),
            Err(StoreError::NoVersions { .. })
        ));
    }
}
