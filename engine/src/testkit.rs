//! Test helpers: repositories in memory ([`MemBackend`]), small sources in temporary files, and
//! the check that every crash and interleaving test ends with: every snapshot restores to the
//! bytes it was taken of, and `verify --read-data` finds nothing wrong.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sbk_store::{
    Backend, CacheLocation, InitOptions, KdfParams, Kind, Lock, LockKind, LockTiming, MemBackend,
    Repository, SnapshotId,
};

use crate::{
    backup, restore, verify, BackupOptions, NoProgress, ReadData, RestoreOptions, RestoreTarget,
    VerifyOptions,
};

/// The password of the test repositories.
const PASSWORD: &str = "test";

/// A new encrypted repository in memory, cut small (64 KiB chunks, 1 MiB packs) so that a few
/// MiB of source make many chunks and several packs.
pub fn mem_repository() -> MemBackend {
    let mem = MemBackend::new();
    Repository::init(
        &mem,
        InitOptions {
            chunk_avg: 64 << 10,
            pack_size: 1 << 20,
            encryption: Some((PASSWORD.into(), KdfParams::weak())),
            ..InitOptions::default()
        },
    )
    .expect("init");
    mem
}

/// Opens the repository on `backend` as a new process would, its index loaded through a cache
/// of its own.
pub fn open(backend: Arc<dyn Backend>) -> crate::Result<Repository> {
    let repo = Repository::open(backend, &mut || Ok(PASSWORD.to_owned()))?;
    repo.load_index(&CacheLocation::Temporary)?;
    Ok(repo)
}

/// Takes a lock as the commands do.
pub fn lock(repo: &Repository, kind: LockKind) -> sbk_store::Result<Lock> {
    repo.lock(kind, "test", LockTiming::default())
}

/// `len` incompressible bytes derived from `seed` (xorshift).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Writes `len` bytes of a source derived from `seed` (runs of random bytes, of repeated bytes
/// shared by every seed, and of zeros) into `dir/name`; returns its path and bytes.
pub fn source(dir: &Path, name: &str, seed: u64, len: usize) -> (PathBuf, Vec<u8>) {
    let mut bytes = Vec::with_capacity(len);
    while bytes.len() < len {
        let run = (300 << 10).min(len - bytes.len());
        match bytes.len() / (300 << 10) % 3 {
            0 => {
                let at = bytes.len() as u64;
                bytes.extend(random_bytes(seed ^ at, run));
            }
            1 => bytes.extend((0..run).map(|i| (i % 251) as u8)),
            _ => bytes.resize(bytes.len() + run, 0),
        }
    }
    let path = dir.join(name);
    std::fs::write(&path, &bytes).expect("source written");
    (path, bytes)
}

/// The options of a plain backup: two threads, host "test", no list, no name.
pub fn backup_options() -> BackupOptions {
    BackupOptions {
        threads: 2,
        host: "test".into(),
        tags: Vec::new(),
        source_name: None,
        cbt_token: None,
        changed: None,
    }
}

/// Backs `path` up under a shared lock; the snapshot written.
pub fn backup_one(repo: &Repository, path: &Path) -> crate::Result<SnapshotId> {
    let lock = lock(repo, LockKind::Shared)?;
    let opts = backup_options();
    let mut results = backup(repo, &lock, &[path.to_owned().into()], &opts, &NoProgress)?;
    Ok(results.remove(0)?.snapshot)
}

/// The bytes snapshot `id` restores to.
pub fn restored(repo: &Repository, id: &SnapshotId) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let out = dir.path().join("restored");
    restore(
        repo,
        id,
        &RestoreTarget::Path(out.clone()),
        &RestoreOptions {
            threads: 2,
            force: false,
        },
        &NoProgress,
    )
    .unwrap_or_else(|e| panic!("snapshot {id} restores: {e}"));
    std::fs::read(out).expect("restored file")
}

/// Removes the locks a process that died left behind, as `sbk unlock` does once it is gone.
pub fn clear_locks(backend: &dyn Backend) {
    for l in backend.list(Kind::Lock).expect("locks listed") {
        let _ = backend.delete(Kind::Lock, &l.name);
    }
}

/// Checks the repository on `backend` as a new process: every snapshot in it is one of
/// `expected` and restores byte-identical to it, and `verify --read-data` finds no problem.
pub fn assert_sound(
    backend: Arc<dyn Backend>,
    expected: &HashMap<SnapshotId, Vec<u8>>,
    when: &str,
) {
    let repo = open(backend).unwrap_or_else(|e| panic!("{when}: the repository opens: {e}"));
    for id in repo.snapshot_ids().expect("snapshots listed") {
        let want = expected
            .get(&id)
            .unwrap_or_else(|| panic!("{when}: snapshot {id} is one that was taken"));
        assert!(
            &restored(&repo, &id) == want,
            "{when}: snapshot {id} restores byte-identical"
        );
    }
    let report = verify(
        &repo,
        &VerifyOptions {
            snapshots: Vec::new(),
            read_data: ReadData::All,
            threads: 2,
        },
        &NoProgress,
    )
    .unwrap_or_else(|e| panic!("{when}: verify runs: {e}"));
    let problems: Vec<&str> = report.problems.iter().map(|p| p.what.as_str()).collect();
    assert!(problems.is_empty(), "{when}: verify finds {problems:?}");
}
