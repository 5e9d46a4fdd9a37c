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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::backend::{Backend, Kind};
use crate::clock::unix_now as now;
use crate::codec::{invalid, split_checksum, Decoder, Encoder};
use crate::error::{DecodeError, Result, StoreError};
use crate::id::to_hex;

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

/// The storage's "now" for judging `locks`: when it wrote our own object (`ours`); when the
/// listing did not show it yet, the latest time it shows, which is earlier than the storage's
/// now and so can only make other locks look younger, never stale too early.
fn storage_now(locks: &[FoundLock], ours: Option<i64>) -> i64 {
    ours.unwrap_or_else(|| locks.iter().map(|l| l.modified).max().unwrap_or(i64::MIN))
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
    let listed = list_locks(backend);
    // The probe goes whatever the listing did; a failed delete leaves a lock of a process that
    // is gone once this one ends, which the next unlock removes.
    let _ = backend.delete(Kind::Lock, &probe_name);
    let (probe, others): (Vec<FoundLock>, Vec<FoundLock>) =
        listed?.into_iter().partition(|l| l.name == probe_name);
    let storage_now = storage_now(&others, probe.first().map(|p| p.modified));
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

/// A conflicting lock: its name and contents.
type Conflict = (String, LockInfo);

/// The first live lock other than `ours` that conflicts with taking one of `kind`, and when
/// the storage wrote ours (`None` if the listing did not show it).
fn conflicting(
    backend: &dyn Backend,
    ours: &str,
    kind: LockKind,
    host: &str,
) -> Result<(Option<Conflict>, Option<i64>)> {
    let locks = list_locks(backend)?;
    let written = locks.iter().find(|l| l.name == ours).map(|l| l.modified);
    let storage_now = storage_now(&locks, written);
    let conflict = locks.into_iter().find_map(|other| {
        if other.name == ours {
            return None;
        }
        let live = other.live(host, storage_now);
        // A lock object that does not decode (from a newer sbk, or damaged) may stand for
        // anything: it conflicts with everything until `sbk unlock` removes it.
        let o = other.info.unwrap_or_else(|e| LockInfo {
            kind: LockKind::Exclusive,
            host: "?".into(),
            pid: 0,
            time: now(),
            lease_secs: 0,
            started: 0,
            purpose: format!("unreadable lock object: {e}"),
        });
        (live && kind.conflicts_with(o.kind)).then_some((other.name, o))
    });
    Ok((conflict, written))
}

/// Time since boot, suspended time included (CLOCK_BOOTTIME): a lease runs on while the machine
/// sleeps, which the monotonic clock behind `Instant` does not count.
fn boot_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    #[allow(unsafe_code)]
    let r = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if r != 0 {
        // Not on Linux since 2.6.39; the monotonic clock is the next best.
        static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        return BASE.get_or_init(Instant::now).elapsed();
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Whether the holder of a repository still holds its lock; shared by the lock's refresher and
/// the repository, which checks it before every operation.
#[derive(Debug, Default)]
pub(crate) struct Lease {
    lost: AtomicBool,
    why: Mutex<String>,
    /// Half a lease after the last successful refresh: past it the lease counts as lost even if
    /// the refresh is still hanging (a storage that never answers must not keep us going).
    deadline: Mutex<Option<Duration>>,
}

impl Lease {
    /// Fails once the lease is lost.
    pub(crate) fn check(&self) -> Result<()> {
        if !self.lost.load(Ordering::Acquire) {
            let deadline = *self.deadline.lock().expect("no thread panics holding this");
            match deadline {
                Some(d) if boot_now() > d => self.lose(
                    "no refresh of the lock succeeded for half its lease (the storage does not answer)"
                        .into(),
                ),
                _ => return Ok(()),
            }
        }
        Err(StoreError::LeaseLost(
            self.why
                .lock()
                .expect("no thread panics holding this")
                .clone(),
        ))
    }

    /// A refresh (or the lock itself) succeeded now.
    fn renewed(&self, lease: Duration) {
        *self.deadline.lock().expect("no thread panics holding this") =
            Some(boot_now() + lease / 2);
    }

    /// The lock was released: nothing to lose any more.
    fn released(&self) {
        *self.deadline.lock().expect("no thread panics holding this") = None;
    }

    fn lose(&self, why: String) {
        let mut w = self.why.lock().expect("no thread panics holding this");
        if !self.lost.load(Ordering::Acquire) {
            *w = why;
            self.lost.store(true, Ordering::Release);
        }
    }
}

/// A held lock; released (its object removed) on drop.
pub struct Lock {
    backend: Arc<dyn Backend>,
    name: String,
    started: i64,
    stop: Arc<AtomicBool>,
    refresher: Option<std::thread::JoinHandle<()>>,
    lease: Arc<Lease>,
}

impl Lock {
    /// Takes a lock of `kind`, or fails naming the holder of a conflicting live lock. From now
    /// on the lock is refreshed every `timing.refresh`; if that fails, `lease` is marked lost.
    /// (Through [`crate::Repository::lock`], which checks the lease before every operation.)
    pub(crate) fn acquire(
        backend: Arc<dyn Backend>,
        lease: Arc<Lease>,
        kind: LockKind,
        purpose: &str,
        timing: LockTiming,
    ) -> Result<Lock> {
        let host = holder_id();
        let mut info = LockInfo {
            kind,
            host: host.clone(),
            pid: std::process::id(),
            time: now(),
            lease_secs: timing.lease.as_secs().clamp(1, u64::from(u32::MAX)) as u32,
            started: 0,
            purpose: purpose.to_owned(),
        };
        let name = to_hex(
            &crate::id::random_bytes::<16>().map_err(|e| StoreError::io(backend.location(), e))?,
        );
        // Two processes that take conflicting locks at the same moment both see each other and
        // both back off; a few retries at growing intervals let the one that can go on, go on.
        let mut attempt = 0;
        loop {
            info.time = now();
            backend.write_once(Kind::Lock, &name, &info.encode())?;
            let found = conflicting(backend.as_ref(), &name, kind, &host);
            let (conflict, written) = found.inspect_err(|_| {
                let _ = backend.delete(Kind::Lock, &name);
            })?;
            let Some((other, o)) = conflict else {
                // Recorded by the first refresh, which changes the object's own time. A
                // listing that did not show our lock leaves the earliest time there is: prune
                // then takes us for older than any mark, which only makes it wait.
                info.started = written.unwrap_or(1);
                break;
            };
            let _ = backend.delete(Kind::Lock, &name);
            attempt += 1;
            if attempt == 4 {
                return Err(StoreError::Locked {
                    path: crate::pack::object_path(Kind::Lock, &other),
                    holder: format!(
                        "{} lock of process {} on {} ({}), taken at {}",
                        o.kind.article(),
                        o.pid,
                        o.host,
                        o.purpose,
                        o.time
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(25 << attempt));
        }
        lease.renewed(timing.lease);
        let info_started = info.started;
        let stop = Arc::new(AtomicBool::new(false));
        let refresher = {
            let (stop, backend, name, lease) =
                (stop.clone(), backend.clone(), name.clone(), lease.clone());
            std::thread::Builder::new()
                .name("sbk-lock".into())
                .spawn(move || refresh_loop(&*backend, &name, info, timing, &stop, &lease))
        };
        let refresher = match refresher {
            Ok(t) => t,
            Err(e) => {
                let _ = backend.delete(Kind::Lock, &name);
                lease.released();
                return Err(StoreError::io("lock refresher thread", e));
            }
        };
        Ok(Lock {
            backend,
            name,
            started: info_started,
            stop,
            refresher: Some(refresher),
            lease,
        })
    }

    /// The lock object's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// When the storage wrote the lock object (seconds since the Unix epoch, its clock; 1 if
    /// the listing after taking it did not show it).
    pub fn started(&self) -> i64 {
        self.started
    }
}

/// Refreshes the lock until `stop`; marks the lease lost when the lock is gone, or when no
/// refresh has succeeded for half the lease (retrying every quarter interval meanwhile), which
/// leaves the other half for the operation to notice and stop.
fn refresh_loop(
    backend: &dyn Backend,
    name: &str,
    mut info: LockInfo,
    timing: LockTiming,
    stop: &AtomicBool,
    lease: &Lease,
) {
    let mut last_ok = boot_now();
    let mut wait = timing.refresh;
    while !stop.load(Ordering::Relaxed) {
        std::thread::park_timeout(wait);
        if stop.load(Ordering::Relaxed) {
            break;
        }
        // A holder that slept past half its lease (a suspended machine) may already count as
        // gone to others: it must not revive its lock as if nothing happened.
        if lease.check().is_err() {
            break;
        }
        info.time = now();
        match backend.replace(Kind::Lock, name, &info.encode()) {
            Ok(()) => {
                last_ok = boot_now();
                lease.renewed(timing.lease);
                wait = timing.refresh;
            }
            Err(StoreError::ObjectMissing { .. }) => {
                lease.lose(format!(
                    "lock {name} was removed by someone else (sbk unlock on another host?)"
                ));
                break;
            }
            Err(e) => {
                let failing = boot_now().saturating_sub(last_ok);
                if failing >= timing.lease / 2 {
                    lease.lose(format!(
                        "refreshing lock {name} failed for {} s: {e}",
                        failing.as_secs()
                    ));
                    break;
                }
                wait = timing.refresh / 4;
            }
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.refresher.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        // Pins first: a pin whose lock is gone protects nothing and is cleaned by prune anyway.
        remove_pins(self.backend.as_ref(), &self.name);
        let _ = self.backend.delete(Kind::Lock, &self.name);
        self.lease.released();
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalBackend;
    use proptest::prelude::*;

    fn backend() -> (tempfile::TempDir, Arc<dyn Backend>) {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(&dir.path().join("r"));
        b.create().unwrap();
        (dir, Arc::new(b))
    }

    fn take(b: &Arc<dyn Backend>, kind: LockKind) -> Result<Lock> {
        Lock::acquire(
            b.clone(),
            Arc::default(),
            kind,
            "test",
            LockTiming::default(),
        )
    }

    #[test]
    fn shared_locks_coexist_and_exclusive_excludes() {
        let (_dir, b) = backend();
        let x = take(&b, LockKind::Shared).unwrap();
        let y = take(&b, LockKind::Shared).unwrap();
        assert!(matches!(
            take(&b, LockKind::Exclusive),
            Err(StoreError::Locked { .. })
        ));
        drop((x, y));
        let e = take(&b, LockKind::Exclusive).unwrap();
        assert!(take(&b, LockKind::Shared).is_err());
        drop(e);
        assert!(
            list_locks(b.as_ref()).unwrap().is_empty(),
            "locks are removed on drop"
        );
    }

    #[test]
    fn one_rule_judges_every_lock_by_the_storage_clock() {
        let (_dir, b) = backend();
        let t = 1_000_000;
        let found = |info: &LockInfo, modified| FoundLock {
            name: "x".into(),
            info: Ok(info.clone()),
            modified,
        };
        let dead = LockInfo {
            kind: LockKind::Exclusive,
            host: holder_id(),
            pid: u32::MAX - 1,
            time: now(),
            lease_secs: 1800,
            started: 0,
            purpose: "prune".into(),
        };
        assert_eq!(
            found(&dead, t).liveness(&holder_id(), t),
            Liveness::ProcessGone { pid: u32::MAX - 1 }
        );
        b.write_once(Kind::Lock, "x", &dead.encode()).unwrap();
        // A lock of a dead process does not block.
        drop(take(&b, LockKind::Shared).unwrap());
        // Elsewhere, only the storage's times count; the holder's own clock (a day behind
        // here) does not.
        let elsewhere = LockInfo {
            host: "elsewhere".into(),
            time: now() - 86_400,
            ..dead
        };
        assert_eq!(
            found(&elsewhere, t - 1801).liveness(&holder_id(), t),
            Liveness::Expired {
                age: 1801,
                lease: 1800
            }
        );
        assert_eq!(
            found(&elsewhere, t - 1800).liveness(&holder_id(), t),
            Liveness::Live
        );
        let unreadable = FoundLock {
            name: "y".into(),
            info: Err(DecodeError::UnsupportedVersion(9)),
            modified: 0,
        };
        let verdict = unreadable.liveness(&holder_id(), t);
        assert!(matches!(verdict, Liveness::Unreadable(_)));
        assert!(verdict.holds(), "an unreadable lock might be anyone's");
    }

    #[test]
    fn unlock_removes_what_no_longer_holds_and_keeps_the_rest() {
        let (_dir, b) = backend();
        let dead = LockInfo {
            kind: LockKind::Shared,
            host: holder_id(),
            pid: u32::MAX - 1,
            time: now(),
            lease_secs: 1800,
            started: 0,
            purpose: "backup".into(),
        };
        b.write_once(Kind::Lock, "dead", &dead.encode()).unwrap();
        b.write_once(Kind::Pin, "dead.aa", b"pinned").unwrap();
        b.write_once(Kind::Lock, "garbage", b"not a lock").unwrap();
        let live = LockInfo {
            host: "elsewhere".into(),
            pid: 1,
            ..dead.clone()
        };
        b.write_once(Kind::Lock, "live", &live.encode()).unwrap();
        let mut verdicts = remove_stale_locks(b.as_ref()).unwrap();
        verdicts.sort_by(|x, y| x.name.cmp(&y.name));
        let seen: Vec<(&str, bool)> = verdicts
            .iter()
            .map(|v| (v.name.as_str(), v.removed))
            .collect();
        assert_eq!(
            seen,
            vec![("dead", true), ("garbage", true), ("live", false)]
        );
        assert!(matches!(verdicts[0].liveness, Liveness::ProcessGone { .. }));
        assert!(matches!(verdicts[1].liveness, Liveness::Unreadable(_)));
        let left: Vec<String> = list_locks(b.as_ref())
            .unwrap()
            .into_iter()
            .map(|l| l.name)
            .collect();
        assert_eq!(left, vec!["live"], "the probe is gone too");
        assert!(
            b.list(Kind::Pin).unwrap().is_empty(),
            "pins go with their lock"
        );
    }

    #[test]
    fn leases_run_on_the_storage_clock_not_the_holders() {
        let (dir, b) = backend();
        // Held on a host whose clock is a day behind: written just now, so it is live.
        let skewed = LockInfo {
            kind: LockKind::Shared,
            host: "elsewhere".into(),
            pid: 1,
            time: now() - 86_400,
            lease_secs: 1800,
            started: 0,
            purpose: "backup".into(),
        };
        b.write_once(Kind::Lock, "skewed", &skewed.encode())
            .unwrap();
        assert!(take(&b, LockKind::Exclusive).is_err(), "a live lock blocks");
        // Not written for longer than its lease by the storage's clock: stale, whatever its
        // holder's clock said when it wrote it.
        let path = dir.path().join("r").join("locks").join("skewed");
        let old = std::time::SystemTime::now() - Duration::from_secs(3600);
        let fresh = LockInfo {
            time: now(),
            ..skewed
        };
        std::fs::write(&path, fresh.encode()).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        drop(take(&b, LockKind::Exclusive).expect("a stale lock does not block"));
    }

    #[test]
    fn a_removed_lock_loses_the_lease_before_it_expires() {
        let (_dir, b) = backend();
        let lease = Arc::new(Lease::default());
        let timing = LockTiming {
            refresh: Duration::from_millis(50),
            lease: Duration::from_secs(2),
        };
        let lock = Lock::acquire(b.clone(), lease.clone(), LockKind::Shared, "t", timing).unwrap();
        lease.check().unwrap();
        b.delete(Kind::Lock, lock.name()).unwrap();
        let started = Instant::now();
        while lease.check().is_ok() {
            assert!(started.elapsed() < timing.lease, "lease not lost in time");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(matches!(lease.check(), Err(StoreError::LeaseLost(_))));
    }

    #[test]
    fn refreshes_that_keep_failing_lose_the_lease_within_half_of_it() {
        let (_dir, local) = backend();
        // Operation 1 (taking the lock) works; every refresh after it fails with EIO.
        let b: Arc<dyn Backend> = Arc::new(crate::backend::FaultyBackend::new(
            local,
            crate::backend::FaultMode::Fail,
            2,
        ));
        let lease = Arc::new(Lease::default());
        let timing = LockTiming {
            refresh: Duration::from_millis(40),
            lease: Duration::from_secs(2),
        };
        let started = Instant::now();
        let _lock = Lock::acquire(b, lease.clone(), LockKind::Shared, "t", timing).unwrap();
        while lease.check().is_ok() {
            assert!(started.elapsed() < timing.lease, "lease not lost in time");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            started.elapsed() >= timing.lease / 2,
            "a few failed refreshes are retried first"
        );
        // Lost by the refresher (which names the injected fault) or by the deadline that
        // covers a refresh that hangs; both at half the lease.
        let e = lease.check().unwrap_err().to_string();
        assert!(e.contains("refresh"), "{e}");
    }

    proptest! {
        #[test]
        fn lock_round_trip(pid in any::<u32>(), time in any::<i64>(), lease_secs in any::<u32>(), host in ".{0,30}", purpose in ".{0,30}") {
            let l = LockInfo { kind: LockKind::Shared, host, pid, time, lease_secs, started: time ^ 7, purpose };
            prop_assert_eq!(LockInfo::decode(&l.encode()).unwrap(), l);
        }

        #[test]
        fn lock_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = LockInfo::decode(&bytes);
        }
    }
}
