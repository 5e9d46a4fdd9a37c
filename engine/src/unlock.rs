//! `unlock`: removes the locks that no longer hold, by the one liveness rule
//! ([`sbk_store::FoundLock::liveness`]).

use sbk_store::{Backend, LockVerdict, Repository};

use crate::error::Result;

/// Removes every lock of the repository at `backend` that no longer holds (its process gone
/// from this host, its lease run out by the storage's clock, or unreadable), with its pins, and
/// says of each lock which rule judged it. Needs only the lock objects: no password, no index,
/// no cache; the config only to know that a repository of a format this sbk reads is there.
pub fn unlock(backend: &dyn Backend) -> Result<Vec<LockVerdict>> {
    Repository::read_config(backend)?;
    Ok(sbk_store::remove_stale_locks(backend)?)
}
