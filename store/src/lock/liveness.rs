//! The one liveness rule: whether a lock found in the repository may still be held, judged by
//! the storage's clock; and `sbk unlock`'s removal of the locks that no longer hold.

use crate::backend::{Backend, Kind};
use crate::clock::unix_now as now;
use crate::error::{DecodeError, Result, StoreError};
use crate::id::to_hex;

use super::{holder_id, list_locks, remove_pins, LockInfo, LockKind};

/// A lock found in the repository.
#[derive(Debug)]
pub struct FoundLock {
    /// The lock object's name.
    pub name: String,
    /// Its contents, or why they could not be read.
    pub info: Result<LockInfo, DecodeError>,
    /// When the storage last wrote it (taken or refreshed).
    pub modified: i64,
}

/// Whether a lock found in the repository may still be held, and by which rule it was judged:
/// the one liveness rule, which backups, prune, pins and `sbk unlock` all apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// It may still be held.
    Live,
    /// Its holder ran with this very holder identity ([`holder_id`]) and its process is gone.
    ProcessGone {
        /// The holder's process id.
        pid: u32,
    },
    /// The storage last wrote it longer than its lease before the storage's "now".
    Expired {
        /// Seconds since the storage last wrote it.
        age: i64,
        /// Its lease in seconds.
        lease: u32,
    },
    /// It does not decode (a newer sbk's, or damaged): it might be anyone's, so it counts as
    /// held, and conflicts with every lock, until `sbk unlock` removes it.
    Unreadable(String),
}

impl Liveness {
    /// Whether the lock counts as held: live, or unreadable.
    pub fn holds(&self) -> bool {
        matches!(self, Liveness::Live | Liveness::Unreadable(_))
    }
}

impl std::fmt::Display for Liveness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Liveness::Live => f.write_str("refreshed within its lease, by the storage's clock"),
            Liveness::ProcessGone { pid } => {
                write!(f, "process {pid} no longer exists on this host")
            }
            Liveness::Expired { age, lease } => write!(
                f,
                "not refreshed for {age} s by the storage's clock (lease {lease} s)"
            ),
            Liveness::Unreadable(e) => write!(f, "unreadable lock object: {e}"),
        }
    }
}

impl FoundLock {
    /// The liveness rule, judged without any host's clock: a lock is gone when its process is
    /// gone from this very holder identity ([`holder_id`]: the same host, process-id namespace
    /// and boot), or when the storage last wrote it longer than its lease before `storage_now`
    /// (the storage's clock: the time of the caller's own lock or probe object). A host whose
    /// clock runs behind cannot make its live lock look stale, nor one ahead a stale lock live.
    pub fn liveness(&self, holder: &str, storage_now: i64) -> Liveness {
        match &self.info {
            Ok(i) if i.process_gone(holder) => Liveness::ProcessGone { pid: i.pid },
            Ok(i) => {
                let age = storage_now - self.modified;
                if age > i64::from(i.lease_secs) {
                    Liveness::Expired {
                        age,
                        lease: i.lease_secs,
                    }
                } else {
                    Liveness::Live
                }
            }
            Err(e) => Liveness::Unreadable(e.to_string()),
        }
    }

    /// Whether the lock counts as held ([`FoundLock::liveness`]).
    pub fn live(&self, holder: &str, storage_now: i64) -> bool {
        self.liveness(holder, storage_now).holds()
    }

    /// When its holder took it, by the storage's clock: recorded in the lock by its first
    /// refresh, and until then the time the object was written (it has not been replaced).
    pub fn started(&self) -> i64 {
        match &self.info {
            Ok(i) if i.started != 0 => i.started,
            _ => self.modified,
        }
    }
}

/// The storage's "now" for judging `locks`: when it wrote our own object (`ours`); when the
/// listing did not show it yet, the latest time it shows, which is earlier than the storage's
/// now and so can only make other locks look younger, never stale too early.
pub(super) fn storage_now(locks: &[FoundLock], ours: Option<i64>) -> i64 {
    ours.unwrap_or_else(|| locks.iter().map(|l| l.modified).max().unwrap_or(i64::MIN))
}

/// Every lock object, listed again (a few times, at growing intervals) until the listing shows
/// `ours`, just written: its time is the storage's "now". `None` when the listing still lags.
pub(super) fn list_showing(
    backend: &dyn Backend,
    ours: &str,
) -> Result<(Vec<FoundLock>, Option<i64>)> {
    let mut attempt = 0;
    loop {
        let locks = list_locks(backend)?;
        let written = locks.iter().find(|l| l.name == ours).map(|l| l.modified);
        if written.is_some() || attempt == 3 {
            return Ok((locks, written));
        }
        attempt += 1;
        std::thread::sleep(std::time::Duration::from_millis(20 << attempt));
    }
}

/// What [`remove_stale_locks`] found of one lock.
#[derive(Debug)]
pub struct LockVerdict {
    /// The lock object's name.
    pub name: String,
    /// Its contents, when they could be read.
    pub info: Option<LockInfo>,
    /// Whether it holds, and by which rule.
    pub liveness: Liveness,
    /// True when it was removed (with its pins).
    pub removed: bool,
}

/// Removes every lock that no longer holds by the liveness rule ([`FoundLock::liveness`]), and
/// unreadable ones, with their pins; keeps the rest. The storage's time comes from a probe
/// object of its own: a pin lock (which conflicts with nothing) written, listed, and removed.
pub fn remove_stale_locks(backend: &dyn Backend) -> Result<Vec<LockVerdict>> {
    let holder = holder_id();
    let probe = LockInfo {
        kind: LockKind::Pin,
        host: holder.clone(),
        pid: std::process::id(),
        time: now(),
        lease_secs: 60,
        started: 0,
        purpose: "unlock: reading the storage's clock".into(),
    };
    let probe_name = to_hex(
        &crate::id::random_bytes::<16>().map_err(|e| StoreError::io(backend.location(), e))?,
    );
    backend.write_once(Kind::Lock, &probe_name, &probe.encode())?;
    let listed = list_showing(backend, &probe_name);
    // The probe goes whatever the listing did; a failed delete leaves a lock of a process that
    // is gone once this one ends, which the next unlock removes.
    let _ = backend.delete(Kind::Lock, &probe_name);
    let (locks, probed) = listed?;
    // Without the storage's time no lease can be judged: unlock guesses nothing.
    let Some(storage_now) = probed else {
        return Err(StoreError::StorageUnreachable {
            location: backend.location(),
            detail: "the storage does not list unlock's own probe object yet (a listing that lags behind writes); run unlock again".into(),
        });
    };
    let others = locks.into_iter().filter(|l| l.name != probe_name);
    let mut out = Vec::new();
    for lock in others {
        let liveness = lock.liveness(&holder, storage_now);
        let removed = !matches!(liveness, Liveness::Live);
        if removed {
            // The pins of a stale server lock go with it (prune removes them too).
            remove_pins(backend, &lock.name);
            match backend.delete(Kind::Lock, &lock.name) {
                Ok(()) | Err(StoreError::ObjectMissing { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        out.push(LockVerdict {
            name: lock.name,
            info: lock.info.ok(),
            liveness,
            removed,
        });
    }
    Ok(out)
}
