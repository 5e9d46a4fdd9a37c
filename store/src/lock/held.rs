//! A held lock: taken by create-then-check, refreshed while it lives, released on drop; and
//! the lease that every repository operation of its holder checks first.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::backend::{Backend, Kind};
use crate::clock::unix_now as now;
use crate::error::{Result, StoreError};
use crate::id::to_hex;

use super::liveness::{list_showing, storage_now};
use super::{holder_id, remove_pins, LockInfo, LockKind, LockTiming};

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
    let (locks, written) = list_showing(backend, ours)?;
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
        if backend.read_only().is_some() {
            // Nothing can be written: a lock without an object (no name), which protects
            // nothing and is never refreshed (so no lease to lose), for a view of the past
            // that needs none.
            return Ok(Lock {
                backend,
                name: String::new(),
                started: crate::clock::unix_now(),
                stop: Arc::new(AtomicBool::new(true)),
                refresher: None,
                lease,
            });
        }
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
                    path: Kind::Lock.object_path(&other),
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
        if !self.name.is_empty() {
            // Pins first: a pin whose lock is gone protects nothing and is cleaned by prune
            // anyway.
            remove_pins(self.backend.as_ref(), &self.name);
            let _ = self.backend.delete(Kind::Lock, &self.name);
        }
        self.lease.released();
    }
}
