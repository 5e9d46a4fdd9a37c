//! Prune beside backups, step by step in one process (docs/design.md, "prune"): each backup and
//! prune opens the repository on its own, as separate processes would, so that a backup can be
//! held between loading the index and writing its snapshot while a prune marks and deletes.

use std::path::{Path, PathBuf};

use sbk_engine::{
    backup, prune, restore, BackupOptions, NoProgress, PruneMode, PruneOptions, PruneReport,
    RestoreOptions, RestoreTarget,
};
use sbk_store::{CacheLocation, InitOptions, Lock, LockKind, LockTiming, Repository, SnapshotId};

struct Repo {
    dir: tempfile::TempDir,
}

impl Repo {
    fn new() -> Repo {
        let dir = tempfile::tempdir().unwrap();
        Repository::init_local(
            &dir.path().join("repo"),
            InitOptions {
                chunk_avg: 64 << 10,
                pack_size: 1 << 20,
                ..InitOptions::default()
            },
        )
        .unwrap();
        Repo { dir }
    }

    /// The repository as a new process opens it: locked, then its index (and marks) loaded.
    fn open(&self, kind: LockKind) -> (Repository, Lock) {
        let repo = Repository::open_local(
            &self.dir.path().join("repo"),
            &CacheLocation::Temporary,
            None,
        )
        .unwrap();
        let lock = repo.lock(kind, "test", LockTiming::default()).unwrap();
        repo.load_index(&CacheLocation::Temporary).unwrap();
        (repo, lock)
    }

    /// 3 MiB from the kernel's random source.
    fn image(&self, name: &str) -> PathBuf {
        use std::io::Read;
        let mut data = Vec::new();
        std::fs::File::open("/dev/urandom")
            .unwrap()
            .take(3 << 20)
            .read_to_end(&mut data)
            .unwrap();
        let path = self.dir.path().join(name);
        std::fs::write(&path, data).unwrap();
        path
    }

    /// Backs `image` up through an opened repository; returns the snapshot and its new chunks.
    fn backup_with(repo: &Repository, lock: &Lock, image: &Path) -> (SnapshotId, u64) {
        let opts = BackupOptions {
            threads: 2,
            host: "h".into(),
            tags: Vec::new(),
            source_name: None,
            cbt_token: None,
            changed: None,
        };
        let out = backup(
            repo,
            lock,
            &[image.to_path_buf().into()],
            &opts,
            &NoProgress,
        )
        .unwrap();
        let o = out.into_iter().next().unwrap().unwrap();
        (o.snapshot, o.manifest.figures.new_chunks)
    }

    fn backup(&self, image: &Path) -> (SnapshotId, u64) {
        let (repo, lock) = self.open(LockKind::Shared);
        Self::backup_with(&repo, &lock, image)
    }

    fn forget(&self, id: &SnapshotId) {
        let (repo, _lock) = self.open(LockKind::Shared);
        repo.remove_snapshot(id).unwrap();
    }

    fn prune(&self) -> PruneReport {
        let (repo, lock) = self.open(LockKind::Prune);
        let opts = PruneOptions {
            max_unused_percent: 0.0,
            dry_run: false,
            threads: 2,
            mode: PruneMode::Beside { grace_secs: 0 },
        };
        prune(&repo, &lock, &opts, &NoProgress).unwrap()
    }

    fn packs(&self) -> usize {
        let (repo, _lock) = self.open(LockKind::Shared);
        repo.list_packs().unwrap().len()
    }

    /// Restores `id` and compares it with `image`, byte for byte.
    fn check(&self, id: &SnapshotId, image: &Path) {
        let (repo, _lock) = self.open(LockKind::Shared);
        let out = self.dir.path().join("restored");
        let _ = std::fs::remove_file(&out);
        let opts = RestoreOptions {
            threads: 2,
            force: true,
        };
        restore(
            &repo,
            id,
            &RestoreTarget::Path(out.clone()),
            &opts,
            &NoProgress,
        )
        .unwrap();
        assert!(
            std::fs::read(&out).unwrap() == std::fs::read(image).unwrap(),
            "snapshot {id} restores byte-identical"
        );
    }
}

#[test]
fn a_backup_older_than_the_mark_revives_what_it_refers_to() {
    let r = Repo::new();
    let a = r.image("a");
    let (first, _) = r.backup(&a);
    r.forget(&first);
    // A backup starts (lock, index) while a's data is still unmarked…
    let (b_repo, b_lock) = r.open(LockKind::Shared);
    // …a prune marks a's packs, no snapshot using them…
    let p = r.prune();
    assert!(p.packs_marked > 0 && p.packs_deleted == 0, "{p:?}");
    // …and the backup, which read no mark, finds all of a's chunks stored.
    let (second, new) = Repo::backup_with(&b_repo, &b_lock, &a);
    assert_eq!(new, 0, "dedup against packs it found before the mark");
    // While its lock lives, the marks wait; nothing is deleted.
    let packs = r.packs();
    let p = r.prune();
    assert_eq!(p.packs_deleted, 0, "{p:?}");
    assert_eq!(p.marks_waiting, 1, "{p:?}");
    assert!(
        p.waiting_because
            .as_deref()
            .is_some_and(|w| w.contains("shared lock")),
        "{p:?}"
    );
    assert_eq!(r.packs(), packs);
    drop(b_lock);
    drop(b_repo);
    // Then the mark is acted on: its packs are used again, and stay.
    let p = r.prune();
    assert!(p.packs_revived > 0 && p.packs_deleted == 0, "{p:?}");
    r.check(&second, &a);
}

#[test]
fn a_backup_after_the_mark_stores_marked_data_again_and_the_next_prune_deletes_it() {
    let r = Repo::new();
    let a = r.image("a");
    let (first, stored) = r.backup(&a);
    r.forget(&first);
    let p = r.prune();
    assert!(p.packs_marked > 0, "{p:?}");
    // Started after the mark: the same data is stored again, never found in marked packs.
    let (second, new) = r.backup(&a);
    assert_eq!(new, stored, "every chunk stored again");
    let before = r.packs();
    let p = r.prune();
    assert!(p.packs_deleted > 0 && p.packs_revived == 0, "{p:?}");
    assert!(r.packs() < before);
    r.check(&second, &a);
    // A third prune has nothing left to do with a.
    let p = r.prune();
    assert_eq!((p.packs_deleted, p.packs_marked), (0, 0), "{p:?}");
    r.check(&second, &a);
}

#[test]
fn repacked_packs_go_once_their_blobs_live_on_elsewhere_and_readers_follow() {
    let r = Repo::new();
    let a = r.image("a");
    let b = r.image("b");
    // One snapshot of a and b together in the same packs, then b's half forgotten.
    let mut ab = std::fs::read(&a).unwrap();
    ab.extend(std::fs::read(&b).unwrap());
    let ab_path = r.dir.path().join("ab");
    std::fs::write(&ab_path, &ab).unwrap();
    let (both, _) = r.backup(&ab_path);
    let (only_a, _) = r.backup(&a);
    r.forget(&both);
    // A reader that loaded the index before anything moved…
    let (reader, reader_lock) = r.open(LockKind::Shared);
    drop(reader_lock);
    let manifest = reader.load_manifest(&only_a).unwrap();
    let mut chunks = Vec::new();
    for (i, tree) in manifest.trees.iter().enumerate() {
        for x in reader.load_tree(tree, manifest.segment_len(i)).unwrap() {
            if let sbk_store::Extent::Data { id, .. } = x {
                chunks.push(id);
            }
        }
    }
    let p = r.prune();
    assert!(p.packs_repacked > 0 && p.packs_marked > 0, "{p:?}");
    // A backup now finds every chunk of a stored, in the packs that stay (the repacked ones'
    // used blobs are indexed in their new pack only): it stores nothing again.
    let (again, new) = r.backup(&a);
    assert_eq!(new, 0, "dedup against the copies of repacked blobs");
    let p = r.prune();
    assert!(p.packs_deleted > 0, "{p:?}");
    // …finds the packs it knew gone, refreshes the index and reads where the blobs are now:
    // a chunk through its stale index…
    let packs = reader.list_packs().unwrap();
    let chunk = *chunks
        .iter()
        .find(|c| {
            let stale = reader.locate(c).unwrap().pack;
            !packs.iter().any(|(p, _)| *p == stale)
        })
        .expect("the reader's index names a pack prune deleted");
    let raw = reader.read_blob(&chunk, sbk_store::BlobKind::Data).unwrap();
    assert_eq!(reader.blob_id(&raw), chunk);
    // …and a whole restore.
    let out = r.dir.path().join("late");
    let opts = RestoreOptions {
        threads: 2,
        force: true,
    };
    restore(
        &reader,
        &only_a,
        &RestoreTarget::Path(out.clone()),
        &opts,
        &NoProgress,
    )
    .unwrap();
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&a).unwrap());
    r.check(&only_a, &a);
    r.check(&again, &a);
}
