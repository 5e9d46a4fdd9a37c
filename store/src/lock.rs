//! Repository locks: files in `locks/` that say who uses the repository and how.
//!
//! Backups and restores take a shared lock; prune and repair take an exclusive one. A lock is a
//! small file naming its host, process and time ("lock file" in docs/format.md). Taking a lock is
//! create-then-check: write our file, then look at the others; on a conflict, remove ours and
//! fail. Two processes racing both see each other and both back off, which is safe. A lock is
//! stale when its process is gone (same host) or its lease ran out (any host; a holder refreshes
//! its lock while it lives).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::codec::{invalid, split_checksum, Decoder, Encoder};
use crate::error::{DecodeError, Result, StoreError};
use crate::id::to_hex;

/// Magic of a lock file. Do not change.
pub const LOCK_MAGIC: &[u8; 8] = b"SBKLOCK\0";
/// Lock file format version.
pub const LOCK_VERSION: u32 = 1;
/// A lock not refreshed for this long is stale, whoever holds it.
pub const LEASE_SECS: i64 = 30 * 60;
/// How often a holder rewrites its lock's time.
const REFRESH: Duration = Duration::from_secs(5 * 60);

/// What a lock allows others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum LockKind {
    /// Others may take shared locks too (backup, restore, verify).
    Shared = 1,
    /// Nobody else may hold any lock (prune, repair).
    Exclusive = 2,
}

/// The contents of a lock file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockInfo {
    /// Shared or exclusive.
    pub kind: LockKind,
    /// Host name of the holder.
    pub host: String,
    /// Process id of the holder.
    pub pid: u32,
    /// When the lock was taken or last refreshed (seconds since the Unix epoch).
    pub time: i64,
    /// What the holder is doing (the command).
    pub purpose: String,
}

impl LockInfo {
    /// Encodes a lock file.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        e.bytes(LOCK_MAGIC)
            .u32(LOCK_VERSION)
            .u8(self.kind as u8)
            .u32(self.pid)
            .i64(self.time)
            .str(&self.host)
            .str(&self.purpose);
        e.finish_with_checksum()
    }

    /// Decodes a lock file.
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
            k => return Err(invalid("lock kind", format!("{k}"))),
        };
        let info = LockInfo {
            kind,
            pid: d.u32()?,
            time: d.i64()?,
            host: d.str("host")?,
            purpose: d.str("purpose")?,
        };
        d.end("lock")?;
        Ok(info)
    }

    /// Why this lock is stale, seen from `host` at time `now`; `None` while it is live.
    pub fn stale(&self, host: &str, now: i64) -> Option<String> {
        if self.host == host && !Path::new(&format!("/proc/{}", self.pid)).exists() {
            return Some(format!("process {} no longer exists on {host}", self.pid));
        }
        if now - self.time > LEASE_SECS {
            return Some(format!(
                "not refreshed for {} s (lease {LEASE_SECS} s)",
                now - self.time
            ));
        }
        None
    }
}

/// A lock found in `locks/`.
#[derive(Debug)]
pub struct FoundLock {
    /// The lock file.
    pub path: PathBuf,
    /// Its contents, or why they could not be read.
    pub info: Result<LockInfo, DecodeError>,
}

/// This machine's host name.
pub fn host_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Every lock file of the repository at `repo`.
pub fn list_locks(repo: &Path) -> Result<Vec<FoundLock>> {
    let dir = repo.join("locks");
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::io(&dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| StoreError::io(&dir, e))?.path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'))
        {
            continue; // being written
        }
        match fs::read(&path) {
            Ok(bytes) => out.push(FoundLock {
                info: LockInfo::decode(&bytes),
                path,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {} // released meanwhile
            Err(e) => return Err(StoreError::io(&path, e)),
        }
    }
    Ok(out)
}

/// The first live lock other than `ours` that conflicts with taking one of `kind`.
fn conflicting(
    repo: &Path,
    ours: &Path,
    kind: LockKind,
    host: &str,
) -> Result<Option<(PathBuf, LockInfo)>> {
    Ok(list_locks(repo)?.into_iter().find_map(|other| {
        if other.path == ours {
            return None;
        }
        // A lock file that does not decode (from a newer sbk, or damaged) may stand for anything:
        // it conflicts with everything until `sbk unlock` removes it.
        let o = other.info.unwrap_or_else(|e| LockInfo {
            kind: LockKind::Exclusive,
            host: "?".into(),
            pid: 0,
            time: now(),
            purpose: format!("unreadable lock file: {e}"),
        });
        let conflicts = kind == LockKind::Exclusive || o.kind == LockKind::Exclusive;
        (conflicts && o.stale(host, now()).is_none()).then_some((other.path, o))
    }))
}

/// A held lock; released (its file removed) on drop.
pub struct Lock {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    refresher: Option<std::thread::JoinHandle<()>>,
}

impl Lock {
    /// Takes a lock of `kind` on the repository at `repo`, or fails naming the holder of a
    /// conflicting live lock.
    pub fn acquire(repo: &Path, kind: LockKind, purpose: &str) -> Result<Lock> {
        let dir = repo.join("locks");
        match fs::create_dir(&dir) {
            Ok(()) => crate::fsync_dir(repo)?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(StoreError::io(&dir, e)),
        }
        let host = host_name();
        let info = LockInfo {
            kind,
            host: host.clone(),
            pid: std::process::id(),
            time: now(),
            purpose: purpose.to_owned(),
        };
        let name = to_hex(&crate::id::random_bytes::<16>().map_err(|e| StoreError::io(&dir, e))?);
        let path = dir.join(&name);
        // Two processes that take conflicting locks at the same moment both see each other and
        // both back off; a few retries at growing intervals let the one that can go on, go on.
        let mut attempt = 0;
        loop {
            crate::write_atomic(&path, &info.encode())?;
            let Some((other, o)) = conflicting(repo, &path, kind, &host)? else {
                break;
            };
            let _ = fs::remove_file(&path);
            attempt += 1;
            if attempt == 4 {
                return Err(StoreError::Locked {
                    path: other,
                    holder: format!(
                        "{} lock of process {} on {} ({}), taken at {}",
                        if o.kind == LockKind::Exclusive {
                            "an exclusive"
                        } else {
                            "a shared"
                        },
                        o.pid,
                        o.host,
                        o.purpose,
                        o.time
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(25 << attempt));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let refresher = {
            let (stop, path) = (stop.clone(), path.clone());
            std::thread::Builder::new()
                .name("sbk-lock".into())
                .spawn(move || {
                    let mut info = info;
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::park_timeout(REFRESH);
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        info.time = now();
                        let _ = crate::write_atomic(&path, &info.encode());
                    }
                })
                .ok()
        };
        Ok(Lock {
            path,
            stop,
            refresher,
        })
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.refresher.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn shared_locks_coexist_and_exclusive_excludes() {
        let dir = tempfile::tempdir().unwrap();
        let a = Lock::acquire(dir.path(), LockKind::Shared, "backup").unwrap();
        let b = Lock::acquire(dir.path(), LockKind::Shared, "backup").unwrap();
        let e = Lock::acquire(dir.path(), LockKind::Exclusive, "prune");
        assert!(matches!(e, Err(StoreError::Locked { .. })));
        drop((a, b));
        let e = Lock::acquire(dir.path(), LockKind::Exclusive, "prune").unwrap();
        assert!(Lock::acquire(dir.path(), LockKind::Shared, "backup").is_err());
        drop(e);
        assert!(
            list_locks(dir.path()).unwrap().is_empty(),
            "locks are removed on drop"
        );
    }

    #[test]
    fn locks_of_dead_processes_are_stale() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("locks")).unwrap();
        let dead = LockInfo {
            kind: LockKind::Exclusive,
            host: host_name(),
            pid: u32::MAX - 1,
            time: now(),
            purpose: "prune".into(),
        };
        std::fs::write(dir.path().join("locks").join("x"), dead.encode()).unwrap();
        assert!(dead.stale(&host_name(), now()).is_some());
        // A stale exclusive lock does not block.
        drop(Lock::acquire(dir.path(), LockKind::Shared, "backup").unwrap());
        let old = LockInfo {
            host: "elsewhere".into(),
            time: now() - LEASE_SECS - 1,
            ..dead
        };
        assert!(old.stale(&host_name(), now()).is_some());
        let fresh = LockInfo { time: now(), ..old };
        assert!(fresh.stale(&host_name(), now()).is_none());
    }

    proptest! {
        #[test]
        fn lock_round_trip(pid in any::<u32>(), time in any::<i64>(), host in ".{0,30}", purpose in ".{0,30}") {
            let l = LockInfo { kind: LockKind::Shared, host, pid, time, purpose };
            prop_assert_eq!(LockInfo::decode(&l.encode()).unwrap(), l);
        }

        #[test]
        fn lock_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = LockInfo::decode(&bytes);
        }
    }
}
