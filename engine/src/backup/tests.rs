//! A crash after every backend operation of a backup, over the in-memory backend: every
//! snapshot saved before the crash restores byte-identical, verify --read-data passes, and the
//! next backup finishes.

use std::collections::HashMap;
use std::sync::Arc;

use sbk_store::{Backend, FaultMode, FaultyBackend, MemBackend, SnapshotId};

use crate::testkit::{assert_sound, backup_one, clear_locks, mem_repository, open, source};

/// Every snapshot in `mem` not in `expected` is one of `new`'s backups: it must hold `bytes`.
fn with_new(
    mem: &MemBackend,
    expected: &HashMap<SnapshotId, Vec<u8>>,
    bytes: &[u8],
) -> HashMap<SnapshotId, Vec<u8>> {
    let mut all = expected.clone();
    let repo = open(Arc::new(mem.clone())).expect("opens");
    for id in repo.snapshot_ids().expect("listed") {
        all.entry(id).or_insert_with(|| bytes.to_vec());
    }
    all
}

#[test]
fn a_crash_after_any_backend_operation_of_a_backup_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let base = mem_repository();
    let (path, first_bytes) = source(dir.path(), "disk", 1, 3 << 20);
    let repo = open(Arc::new(base.clone())).unwrap();
    let first = backup_one(&repo, &path).unwrap();
    drop(repo);
    let expected = HashMap::from([(first, first_bytes)]);
    // The source changes; each run below backs it up once more, crashing after operation n.
    let (path, bytes) = source(dir.path(), "disk", 2, 3 << 20);
    let mut crashes = 0;
    for n in 1.. {
        let mem = base.fork();
        let faulty = Arc::new(FaultyBackend::new(
            Arc::new(mem.clone()),
            FaultMode::Fail,
            n,
        ));
        let result = open(faulty.clone()).and_then(|repo| backup_one(&repo, &path));
        let finished = result.is_ok() && faulty.operations() < n;
        crashes += usize::from(!finished);
        // The process is gone: so is what it held.
        clear_locks(&mem);
        let when = format!("after a crash at operation {n}");
        let saved = with_new(&mem, &expected, &bytes);
        assert_sound(Arc::new(mem.clone()), &saved, &when);
        // The next backup finishes, and restores.
        let repo = open(Arc::new(mem.clone())).unwrap();
        let next =
            backup_one(&repo, &path).unwrap_or_else(|e| panic!("{when}: the next backup: {e}"));
        drop(repo);
        let mut saved = saved;
        saved.insert(next, bytes.clone());
        assert_sound(
            Arc::new(mem.clone()) as Arc<dyn Backend>,
            &saved,
            &format!("{when}, then a backup"),
        );
        if finished {
            break;
        }
    }
    assert!(
        crashes >= 4,
        "a backup's lock, packs, index file and manifest: {crashes} crash points"
    );
}

/// Resizes the source to `to` bytes as soon as its backup starts (after it was opened and its
/// size taken), as a writer of a live image would.
struct ResizeOnStart {
    path: std::path::PathBuf,
    to: u64,
}

impl crate::Progress for ResizeOnStart {
    fn start(&self, _task: usize, _label: &str, _total: u64) {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .unwrap();
        f.set_len(self.to).unwrap();
    }
}

#[test]
fn a_source_that_shrinks_or_grows_while_read_fails_without_a_snapshot() {
    use crate::testkit::{backup_options, lock};
    use crate::{backup, EngineError};
    let dir = tempfile::tempdir().unwrap();
    let mem = mem_repository();
    let repo = open(Arc::new(mem.clone())).unwrap();
    let opts = backup_options();
    let len = 3u64 << 20;
    for to in [len / 3, len + 4096, 0] {
        let (path, _) = source(dir.path(), "disk", 7, len as usize);
        let lock = lock(&repo, sbk_store::LockKind::Shared).unwrap();
        let resize = ResizeOnStart {
            path: path.clone(),
            to,
        };
        let mut results = backup(&repo, &lock, &[path.clone().into()], &opts, &resize).unwrap();
        match results.remove(0) {
            Err(EngineError::SourceResized {
                expected, found, ..
            }) => {
                assert_eq!((expected, found), (len, to), "the sizes named");
            }
            other => panic!("resized to {to}: {:?}", other.map(|o| o.snapshot)),
        }
        drop(lock);
        assert!(
            repo.snapshot_ids().unwrap().is_empty(),
            "no snapshot of a source resized to {to}"
        );
    }
}
