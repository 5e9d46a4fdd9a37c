//! Storage backends: the repository as objects named by (kind, name), never by path.
//!
//! Everything above this module reads and writes repository data only through [`Backend`], so
//! that a repository can live on a local disk ([`LocalBackend`]), on object storage (sbk-s3), or
//! in memory for tests ([`MemBackend`]), and so that faults can be injected exactly
//! ([`FaultyBackend`]). One suite ([`contract::check`]) holds all three to the same contract. The contract of each method is the
//! one an object store can keep: whole objects appear atomically, a name is written once (except
//! lock objects, which are replaced by their owner), and a byte range can be read.

mod as_of;
pub mod contract;
mod counting;
mod direct;
mod fault;
mod handles;
pub(crate) mod local;
mod local_staged;
mod mem;

pub use crate::kind::Kind;
pub use as_of::AsOfBackend;
pub use counting::{CountingBackend, ReadCount};
pub use fault::{FaultMode, FaultyBackend, FAULT_ENV};
pub use local::LocalBackend;
pub use mem::MemBackend;

use crate::error::Result;

/// One object as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjectInfo {
    /// Its name within its kind.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// When the storage last wrote it, in seconds since the Unix epoch, by the storage's own
    /// clock (a file's mtime, an object's Last-Modified). Times that prune compares across
    /// hosts come from here, never from a host's clock (docs/design.md, "prune").
    pub modified: i64,
}

/// The objects of a kind whose names parse as ids (anything else in the folder is not ours).
pub(crate) fn list_ids<T: std::str::FromStr, C: FromIterator<T>>(
    backend: &dyn Backend,
    kind: Kind,
) -> Result<C> {
    Ok(backend
        .list_names(kind)?
        .into_iter()
        .filter_map(|name| name.parse().ok())
        .collect())
}

/// One version of an object on storage that keeps versions (see [`Versions`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjectVersion {
    /// The object's name within its kind.
    pub name: String,
    /// When the storage wrote this version (seconds since the Unix epoch, storage clock).
    pub modified: i64,
    /// The storage's id of the version.
    pub version_id: String,
    /// Its size in bytes (0 for a delete marker).
    pub size: u64,
    /// A delete marker: the object was deleted at `modified`.
    pub delete_marker: bool,
    /// The current version of its name (the storage's `IsLatest`).
    pub latest: bool,
}

/// Storage that keeps every version of an object and can hold versions under retention (S3
/// with Object Lock). A delete there only hides an object behind a delete marker; its versions
/// stay readable by id until they are deleted by id, which retention forbids before its date.
pub trait Versions: Send + Sync {
    /// Whether the storage keeps a version of every write here (bucket versioning is on, as
    /// Object Lock turns it on): a history `--as-of` can read.
    fn keeps_versions(&self) -> Result<bool>;

    /// Whether the storage holds versions under Object Lock here (the bucket was created with
    /// it). A bucket that does not exist is [`crate::StoreError::NoBucket`].
    fn object_lock_enabled(&self) -> Result<bool>;

    /// From now on, every object of backup data this backend writes (all kinds but locks and
    /// pins, which must never outlive their holder) is written under retention `lock`, until
    /// [`crate::config::ObjectLock::until`] of the time of the write (the later of the
    /// storage's and this host's clocks). Sends nothing: a bucket without Object Lock refuses
    /// the first retention, and the write fails.
    fn retain_writes(&self, lock: crate::config::ObjectLock);

    /// Every version and delete marker of a kind's objects, by name, the current one first
    /// within a name, then newest first.
    fn versions(&self, kind: Kind) -> Result<Vec<ObjectVersion>>;

    /// Fills `buf` from `offset` of one version of an object.
    fn read_version_at(
        &self,
        kind: Kind,
        name: &str,
        version_id: &str,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()>;

    /// One whole version of an object.
    fn read_version(&self, kind: Kind, name: &str, version_id: &str) -> Result<Vec<u8>>;

    /// Deletes one version (or delete marker) for good. A version under retention is
    /// [`crate::StoreError::Retained`].
    fn delete_version(&self, kind: Kind, name: &str, version_id: &str) -> Result<()>;

    /// The retention date of a version (the newest without `version_id`), seconds since the
    /// Unix epoch; `None` when it has none.
    fn retention(&self, kind: Kind, name: &str, version_id: Option<&str>) -> Result<Option<i64>>;

    /// Extends the retention of a version (the newest without `version_id`) to `until` in the
    /// repository's mode. A date before the one it has is left alone (retention never shortens).
    fn extend_retention(
        &self,
        kind: Kind,
        name: &str,
        version_id: Option<&str>,
        until: i64,
    ) -> Result<()>;

    /// The storage's time now, seconds since the Unix epoch (from the last answer's `Date`,
    /// carried forward by the local clock).
    fn storage_now(&self) -> i64;
}

/// What `write_once` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The object was created.
    Created,
    /// An object of that name was already there and was left alone. For content-addressed
    /// names this is success; for a lock it means the name is taken.
    AlreadyThere,
}

/// An object being written piece by piece (a pack). Nothing is visible under its name until
/// [`Staged::finish`] returns; dropping it without finishing removes what was written.
pub trait Staged: Send {
    /// Appends bytes.
    fn write(&mut self, bytes: &[u8]) -> Result<()>;
    /// Makes the object durable and visible under its name, atomically.
    fn finish(self: Box<Self>) -> Result<()>;
    /// Bytes written so far.
    fn len(&self) -> u64;
    /// True before the first byte.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A place that holds a repository's objects.
///
/// Implementations are shared by every thread of a process; each method is one operation whose
/// failure leaves the objects as they were (a partly written object is never visible).
pub trait Backend: Send + Sync {
    /// Where the repository is, for messages (a directory, a URL).
    fn location(&self) -> String;

    /// Prepares an empty place for a new repository, refusing one that holds anything.
    fn create(&self) -> Result<()>;

    /// Every object of a kind, sorted by name. Objects being written are not listed.
    fn list(&self, kind: Kind) -> Result<Vec<ObjectInfo>>;

    /// The names of every object of a kind, sorted: [`Backend::list`] without sizes and
    /// times, which a local disk answers without a `stat` per object (6,107 index files at
    /// 10^8 chunks: most of a warm open).
    fn list_names(&self, kind: Kind) -> Result<Vec<String>> {
        Ok(self.list(kind)?.into_iter().map(|o| o.name).collect())
    }

    /// A whole object. A missing one is [`crate::StoreError::ObjectMissing`].
    fn read(&self, kind: Kind, name: &str) -> Result<Vec<u8>>;

    /// A hint that an object will be read whole soon (advice only): a local disk starts
    /// reading it, so that the read finds it cached. Storage where that would cost a request
    /// ignores it.
    fn will_read(&self, _kind: Kind, _name: &str) {}

    /// Fills `buf` from `offset` of an object; an object that ends too early is
    /// [`crate::StoreError::ShortObject`].
    fn read_at(&self, kind: Kind, name: &str, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Size of an object.
    fn size(&self, kind: Kind, name: &str) -> Result<u64>;

    /// Creates an object atomically and durably, unless one of that name exists (conditional
    /// create: two writers racing for a name cannot both win).
    fn write_once(&self, kind: Kind, name: &str, bytes: &[u8]) -> Result<Written>;

    /// Starts writing an object piece by piece (see [`Staged`]).
    fn stage(&self, kind: Kind, name: &str) -> Result<Box<dyn Staged>>;

    /// Replaces an existing object atomically and durably; fails with
    /// [`crate::StoreError::ObjectMissing`] if it is gone (a refreshed lock that someone
    /// removed must not come back).
    fn replace(&self, kind: Kind, name: &str, bytes: &[u8]) -> Result<()>;

    /// Deletes an object durably. Deleting a missing object is
    /// [`crate::StoreError::ObjectMissing`].
    fn delete(&self, kind: Kind, name: &str) -> Result<()>;

    /// Removes what interrupted writes left behind (temporary objects, unfinished multipart
    /// uploads) that the storage last wrote before `before` (storage time, seconds since the
    /// Unix epoch; `i64::MAX` for all of them, only safe while no other process writes).
    /// Returns bytes freed.
    fn remove_leftovers(&self, before: i64) -> Result<u64>;

    /// The storage's object versions and retention, where it keeps them (S3); `None` for
    /// storage that keeps only the current object (a local disk, memory).
    fn versions(&self) -> Option<&dyn Versions> {
        None
    }

    /// Why nothing may be written here, for a view that is read-only (`--as-of`); `None` for
    /// a repository that is written as usual. Locks and pins are then not taken: a past view
    /// needs no protection from a prune of the present, and cannot record any.
    fn read_only(&self) -> Option<String> {
        None
    }

    /// True where each read is a request sent, waited for and billed one by one (object
    /// storage): a check that would make one small read per blob leaves it to the reads of
    /// whole packs instead (10^6 chunks would be 10^6 requests).
    fn reads_are_requests(&self) -> bool {
        false
    }
}
