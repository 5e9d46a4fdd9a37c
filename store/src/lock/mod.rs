//! Repository locks: lock objects that say who uses the repository and how.
//!
//! Backups, restores and verify take a shared lock; prune and repair take an exclusive one. A
//! lock object names its host, process, time, lease and purpose ("lock object" in
//! docs/format.md), no paths. Taking a lock is create-then-check: write our object (a
//! conditional create), then look at the others; on a conflict, remove ours and retry a few
//! times. Two processes racing both see each other and both back off, which is safe. A lock is
//! stale when its process is gone (same host) or its lease ran out (any host).
//!
//! A holder refreshes its lock while it lives. A refresh that fails, or that finds its lock
//! removed, marks the lease lost *before* the lease can run out; the repository then refuses
//! every further operation of the holder ([`crate::StoreError::LeaseLost`]), so nothing it does
//! can rely on a lock that others may already consider expired.

mod held;
mod liveness;
#[cfg(test)]
mod tests;

use crate::backend::{Backend, Kind};
use crate::codec::{invalid, split_checksum, Decoder, Encoder};
use crate::error::{DecodeError, Result, StoreError};
use std::time::Duration;

pub(crate) use held::Lease;
pub use held::Lock;
pub use liveness::{remove_stale_locks, FoundLock, Liveness, LockVerdict};

/// Magic of a lock object. Do not change.
pub const LOCK_MAGIC: &[u8; 8] = b"SBKLOCK\0";
/// Lock object format version: 3 added pin locks (kind 3); 4 added prune locks (kind 4) and the
/// storage time the lock was taken at. A lock of another version is unreadable, and so
/// conflicts with every lock until `sbk unlock` removes it.
pub const LOCK_VERSION: u32 = 4;

/// How often a holder refreshes its lock and how long a lock lives unrefreshed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockTiming {
    /// Interval between refreshes.
    pub refresh: Duration,
    /// A lock not refreshed for this long is stale, whoever holds it.
    pub lease: Duration,
}

impl Default for LockTiming {
    /// Refresh every 5 minutes, a 30-minute lease: six refreshes may fail in a row (a storage
    /// hiccup) before the holder gives up, long before the lease runs out.
    fn default() -> Self {
        LockTiming {
            refresh: Duration::from_secs(5 * 60),
            lease: Duration::from_secs(30 * 60),
        }
    }
}

/// What a lock allows others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum LockKind {
    /// Others may take shared locks too (backup, restore, verify).
    Shared = 1,
    /// Nobody else may hold any lock but pins (prune, repair).
    Exclusive = 2,
    /// Conflicts with nothing; keeps the snapshots its holder pinned (their manifests copied
    /// under `pins/`) from prune, even once forgotten (`sbk serve`, which runs for days).
    Pin = 3,
    /// Conflicts with exclusive locks and other prune locks only: prune that runs beside
    /// backups, in two phases (docs/design.md, "prune").
    Prune = 4,
}

impl LockKind {
    /// "a shared", "an exclusive"…: for messages.
    pub fn article(self) -> &'static str {
        match self {
            LockKind::Exclusive => "an exclusive",
            LockKind::Shared => "a shared",
            LockKind::Pin => "a pin",
            LockKind::Prune => "a prune",
        }
    }

    /// Whether holders of these two kinds of lock may not work at once.
    pub fn conflicts_with(self, other: LockKind) -> bool {
        use LockKind::*;
        match (self, other) {
            // A pin conflicts with nothing: prune keeps what it pins instead of waiting for it.
            (Pin, _) | (_, Pin) => false,
            (Exclusive, _) | (_, Exclusive) => true,
            (Prune, Prune) => true,
            _ => false,
        }
    }
}

/// The contents of a lock object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockInfo {
    /// Shared or exclusive.
    pub kind: LockKind,
    /// The holder's host ([`holder_id`]: host name, process-id namespace, boot).
    pub host: String,
    /// Process id of the holder.
    pub pid: u32,
    /// When the lock was taken or last refreshed (seconds since the Unix epoch).
    pub time: i64,
    /// Seconds after `time` at which the lock is stale.
    pub lease_secs: u32,
    /// When the lock object was first written, by the storage's clock (seconds since the Unix
    /// epoch), as the holder saw it listed right after taking it; 0 until then (the object has
    /// not been replaced yet, so its own modification time is that moment). See
    /// [`FoundLock::started`].
    pub started: i64,
    /// What the holder is doing (the command).
    pub purpose: String,
}

impl LockInfo {
    /// Encodes a lock object.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        e.bytes(LOCK_MAGIC)
            .u32(LOCK_VERSION)
            .u8(self.kind as u8)
            .u32(self.pid)
            .i64(self.time)
            .u32(self.lease_secs)
            .i64(self.started)
            .str(&self.host)
            .str(&self.purpose);
        e.finish_with_checksum()
    }

    /// Decodes a lock object.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Decoder::new(bytes);
        d.magic(LOCK_MAGIC)?;
        let version = d.u32()?;
        if version != LOCK_VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let body = split_checksum(bytes)?;
        let mut d = Decoder::new(body);
        d.bytes(12)?;
        let kind = match d.u8()? {
            1 => LockKind::Shared,
            2 => LockKind::Exclusive,
            3 => LockKind::Pin,
            4 => LockKind::Prune,
            k => return Err(invalid("lock kind", format!("{k}"))),
        };
        let info = LockInfo {
            kind,
            pid: d.u32()?,
            time: d.i64()?,
            lease_secs: d.u32()?,
            started: d.i64()?,
            host: d.str("host")?,
            purpose: d.str("purpose")?,
        };
        d.end("lock")?;
        Ok(info)
    }

    /// Whether its holder ran as `holder` (this machine's [`holder_id`]) and its process is
    /// gone.
    pub fn process_gone(&self, host: &str) -> bool {
        self.host == host && !std::path::Path::new(&format!("/proc/{}", self.pid)).exists()
    }
}

/// This machine's host name.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Who holds a lock, as far as a process id can be checked: the host name, the process-id
/// namespace and the boot. Two containers that share a host name (`--network host`, a pod on
/// the host's network) see different process tables; a process id from before a reboot names
/// nobody now. A lock's holder is checked by its process id only when this whole identity is
/// ours (see [`LockInfo::process_gone`]); otherwise its lease decides.
pub fn holder_id() -> String {
    let ns = std::fs::read_link("/proc/self/ns/pid")
        .map(|p| {
            p.to_string_lossy()
                .chars()
                .filter(char::is_ascii_digit)
                .collect::<String>()
        })
        .unwrap_or_default();
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|b| b.trim().chars().take(8).collect::<String>())
        .unwrap_or_default();
    format!("{} (pid ns {ns}, boot {boot})", host_name())
}

/// Every lock object of a repository. Needs nothing but the lock objects.
pub fn list_locks(backend: &dyn Backend) -> Result<Vec<FoundLock>> {
    let mut out = Vec::new();
    for o in backend.list(Kind::Lock)? {
        match backend.read(Kind::Lock, &o.name) {
            Ok(bytes) => out.push(FoundLock {
                info: LockInfo::decode(&bytes),
                name: o.name,
                modified: o.modified,
            }),
            Err(StoreError::ObjectMissing { .. }) => {} // released meanwhile
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Removes the pins of lock `name` (best effort).
pub(crate) fn remove_pins(backend: &dyn Backend, name: &str) {
    if let Ok(pins) = backend.list(Kind::Pin) {
        for p in pins {
            if pin_owner(&p.name) == Some(name) {
                let _ = backend.delete(Kind::Pin, &p.name);
            }
        }
    }
}

/// The lock a pin object belongs to (its name is `<lock>.<snapshot>`).
pub(crate) fn pin_owner(pin: &str) -> Option<&str> {
    pin.split_once('.').map(|(lock, _)| lock)
}
