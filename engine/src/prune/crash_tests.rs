//! A crash after every backend operation of prune's executor, over the in-memory backend, in
//! both modes and both phases: every snapshot that was not forgotten restores byte-identical,
//! verify --read-data passes, and the next prune finishes.

use std::collections::HashMap;
use std::sync::Arc;

use sbk_store::{FaultMode, FaultyBackend, LockKind, MemBackend, SnapshotId};

use super::{prune, PruneMode, PruneOptions, PruneReport};
use crate::testkit::{assert_sound, backup_one, clear_locks, lock, mem_repository, open, source};
use crate::NoProgress;

/// Prunes the repository on `backend` as `sbk prune` does, repacking every pack with an unused
/// blob (so that the executor copies, indexes, marks and deletes).
fn run_prune(backend: Arc<dyn sbk_store::Backend>, mode: PruneMode) -> crate::Result<PruneReport> {
    let repo = open(backend)?;
    let kind = match mode {
        PruneMode::Exclusive => LockKind::Exclusive,
        PruneMode::Beside { .. } => LockKind::Prune,
    };
    let lock = lock(&repo, kind)?;
    prune(
        &repo,
        &lock,
        &PruneOptions {
            max_unused_percent: 0.0,
            dry_run: false,
            threads: 2,
            mode,
        },
        &NoProgress,
    )
}

/// Three sources backed up, then the first one's snapshot forgotten: what prune has to work on,
/// and the snapshots that must survive it.
fn repository_with_garbage() -> (tempfile::TempDir, MemBackend, HashMap<SnapshotId, Vec<u8>>) {
    let dir = tempfile::tempdir().unwrap();
    let mem = mem_repository();
    let repo = open(Arc::new(mem.clone())).unwrap();
    let mut kept = HashMap::new();
    let mut forgotten = None;
    for seed in 1..=3 {
        let (path, bytes) = source(dir.path(), &format!("disk{seed}"), seed, 2 << 20);
        let id = backup_one(&repo, &path).unwrap();
        if seed == 1 {
            forgotten = Some(id);
        } else {
            kept.insert(id, bytes);
        }
    }
    repo.remove_snapshot(&forgotten.unwrap()).unwrap();
    (dir, mem, kept)
}

/// Runs prune in `mode` on copies of `base`, crashing after operation 1, 2, ... until a run
/// finishes; after each crash the repository is sound and the next prune finishes. Returns how
/// many crash points there were, and what the run that finished did.
fn crash_everywhere(
    base: &MemBackend,
    kept: &HashMap<SnapshotId, Vec<u8>>,
    mode: PruneMode,
    what: &str,
) -> (u64, PruneReport) {
    for n in 1.. {
        let mem = base.fork();
        let faulty = Arc::new(FaultyBackend::new(
            Arc::new(mem.clone()),
            FaultMode::Fail,
            n,
        ));
        let result = run_prune(faulty.clone(), mode);
        let finished = result.is_ok() && faulty.operations() < n;
        clear_locks(&mem);
        let when = format!("{what}: after a crash at operation {n}");
        assert_sound(Arc::new(mem.clone()), kept, &when);
        run_prune(Arc::new(mem.clone()), mode)
            .unwrap_or_else(|e| panic!("{when}: the next prune: {e}"));
        assert_sound(
            Arc::new(mem.clone()),
            kept,
            &format!("{when}, then a prune"),
        );
        if let (true, Ok(report)) = (finished, result) {
            return (n - 1, report);
        }
    }
    unreachable!()
}

#[test]
fn a_crash_anywhere_in_an_exclusive_prune_loses_nothing() {
    let (_dir, base, kept) = repository_with_garbage();
    let (points, done) = crash_everywhere(&base, &kept, PruneMode::Exclusive, "exclusive");
    assert!(
        points >= 4,
        "copies, index files, deletes: {points} crash points"
    );
    assert!(
        done.packs_deleted + done.packs_repacked > 0 && done.bytes_removed > 0,
        "{done:?}"
    );
}

#[test]
fn a_crash_anywhere_in_either_phase_of_a_prune_beside_backups_loses_nothing() {
    let beside = PruneMode::Beside { grace_secs: 60 };
    let (_dir, base, kept) = repository_with_garbage();
    // The first run marks (and repacks).
    let (points, done) = crash_everywhere(&base, &kept, beside, "marking");
    assert!(
        points >= 3,
        "copies, index files, marks: {points} crash points"
    );
    assert!(done.packs_marked > 0 && done.packs_deleted == 0, "{done:?}");
    // The second, once the grace period has passed, deletes what the first marked.
    let marked = base.fork();
    let report = run_prune(Arc::new(marked.clone()), beside).unwrap();
    assert!(report.packs_marked > 0, "{report:?}");
    marked.advance(120);
    let (points, done) = crash_everywhere(&marked, &kept, beside, "deleting");
    assert!(
        points >= 2,
        "pack deletes, marks removed: {points} crash points"
    );
    assert!(done.packs_deleted > 0 && done.bytes_removed > 0, "{done:?}");
}
