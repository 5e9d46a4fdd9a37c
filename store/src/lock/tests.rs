//! Locks: conflicts, the liveness rule, unlock, and losing the lease in time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::backend::LocalBackend;
use crate::clock::unix_now as now;
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

/// A lock of this host whose process is gone.
fn dead_lock(kind: LockKind, purpose: &str) -> LockInfo {
    LockInfo {
        kind,
        host: holder_id(),
        pid: u32::MAX - 1,
        time: now(),
        lease_secs: 1800,
        started: 0,
        purpose: purpose.into(),
    }
}

#[test]
fn unlock_judges_leases_by_the_storage_clock_not_the_holders() {
    let mem = crate::backend::MemBackend::new();
    let t = 1_000_000;
    mem.set_time(t);
    // Written long ago by the storage's clock, though its holder's clock said "just now".
    let stale = LockInfo {
        host: "elsewhere".into(),
        pid: 1,
        time: t + 3600,
        ..dead_lock(LockKind::Shared, "backup")
    };
    mem.write_once(Kind::Lock, "stale", &stale.encode())
        .unwrap();
    mem.set_time(t + 3600);
    // Written just now by the storage's clock, though its holder's clock is a day behind.
    let live = LockInfo {
        time: t - 86_400,
        ..stale.clone()
    };
    mem.write_once(Kind::Lock, "live", &live.encode()).unwrap();
    let mut verdicts = remove_stale_locks(&mem).unwrap();
    verdicts.sort_by(|x, y| x.name.cmp(&y.name));
    assert_eq!(verdicts[0].name, "live");
    assert_eq!(verdicts[0].liveness, Liveness::Live);
    assert!(!verdicts[0].removed);
    assert_eq!(verdicts[1].name, "stale");
    assert_eq!(
        verdicts[1].liveness,
        Liveness::Expired {
            age: 3600,
            lease: 1800
        }
    );
    assert!(verdicts[1].removed);
    let left: Vec<String> = list_locks(&mem)
        .unwrap()
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert_eq!(left, vec!["live"]);
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
    let dead = dead_lock(LockKind::Exclusive, "prune");
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
    let dead = dead_lock(LockKind::Shared, "backup");
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
