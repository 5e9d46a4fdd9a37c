//! The repository over the in-memory backend: opening and keys, the one read path (and how it
//! follows a blob a prune moved), marks as backups honour them, and snapshots.

use std::sync::Arc;

use crate::backend::{Backend, Kind, MemBackend};
use crate::blob::BlobKind;
use crate::error::StoreError;
use crate::id::{ChunkId, PackId};
use crate::index::CacheLocation;
use crate::key::KdfParams;
use crate::manifest::Manifest;
use crate::marks::{MarkReason, Marks};
use crate::pack::PackEntry;

use super::{InitOptions, PackGone, Repository};

fn encrypted() -> InitOptions {
    InitOptions {
        encryption: Some(("pw".into(), KdfParams::weak())),
        ..InitOptions::default()
    }
}

fn open(mem: &MemBackend, password: &str) -> crate::Result<Repository> {
    let repo = Repository::open(Arc::new(mem.clone()), &mut || Ok(password.to_owned()))?;
    repo.load_index(&CacheLocation::Temporary)?;
    Ok(repo)
}

/// Opens an unencrypted repository with its index cache in `cache`.
fn open_with_cache(mem: &MemBackend, cache: &std::path::Path) -> Repository {
    let repo = Repository::open(Arc::new(mem.clone()), &mut || Ok(String::new())).unwrap();
    repo.load_index(&CacheLocation::Dir(cache.to_owned()))
        .unwrap();
    repo
}

/// A new unencrypted repository in memory, open.
fn unencrypted() -> (MemBackend, Repository) {
    let mem = MemBackend::new();
    Repository::init(&mem, InitOptions::default()).unwrap();
    let repo = open(&mem, "").unwrap();
    (mem, repo)
}

/// Flips the byte at `at` of an object, as damage on the storage would.
fn flip(mem: &MemBackend, kind: Kind, name: &str, at: usize) {
    let mut bytes = mem.read(kind, name).unwrap();
    bytes[at] ^= 1;
    mem.delete(kind, name).unwrap();
    mem.write_once(kind, name, &bytes).unwrap();
}

/// Stores `blobs` in one new pack named by a new index file; returns the pack and its entries.
fn store(repo: &Repository, blobs: &[&[u8]]) -> (PackId, Vec<PackEntry>) {
    let mut pack = repo.new_pack().unwrap();
    for raw in blobs {
        let id = repo.blob_id(raw);
        pack.add(&repo.encode_blob(id, BlobKind::Data, raw).unwrap())
            .unwrap();
    }
    let (id, entries) = pack.finish().unwrap();
    repo.write_index_file(vec![(id, entries.clone())]).unwrap();
    (id, entries)
}

#[test]
fn an_encrypted_repository_opens_with_its_password_only() {
    let mem = MemBackend::new();
    let config = Repository::init(&mem, encrypted()).unwrap();
    assert!(config.is_encrypted());
    assert_eq!(config.id_hex().len(), 32);
    assert!(matches!(
        open(&mem, "wrong"),
        Err(StoreError::WrongPassword { tried: 1, .. })
    ));
    let repo = open(&mem, "pw").unwrap();
    let second = repo.add_key("other", KdfParams::weak()).unwrap();
    drop(repo);
    let repo = open(&mem, "other").unwrap();
    assert!(repo
        .keys()
        .unwrap()
        .iter()
        .any(|k| k.name == second && k.current));
    assert!(
        matches!(
            Repository::init(&mem, encrypted()),
            Err(StoreError::InitRefused { .. })
        ),
        "init refuses a place that holds a repository"
    );
}

#[test]
fn a_key_file_opens_its_repository_without_a_password_until_it_is_removed() {
    use super::Credential;
    use crate::key::{Kdf, KeyObject};
    use crate::key_file::KeyFile;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mover.key");
    let mem = MemBackend::new();
    Repository::init(&mem, encrypted()).unwrap();
    let repo = open(&mem, "pw").unwrap();
    let name = repo.add_key_file(&path).unwrap();
    assert!(
        matches!(repo.add_key_file(&path), Err(StoreError::KeyRefused(_))),
        "an existing file is never overwritten"
    );
    let with_file = |mem: &MemBackend| {
        let file = KeyFile::load(&path).unwrap();
        Repository::open_with(Arc::new(mem.clone()), &mut || {
            Ok(Credential::KeyFile(
                KeyFile::decode(&file.encode()).unwrap(),
            ))
        })
    };
    let by_file = with_file(&mem).unwrap();
    let keys = by_file.keys().unwrap();
    let current = keys.iter().find(|k| k.current).unwrap();
    assert_eq!(current.name, name);
    assert!(matches!(
        current.key,
        Ok(KeyObject {
            kdf: Kdf::KeyFile,
            ..
        })
    ));
    assert!(
        matches!(
            by_file.change_password("new", KdfParams::weak()),
            Err(StoreError::KeyRefused(_))
        ),
        "a key file has no password to change"
    );
    // A key file manages no keys: one taken from a mover can neither add one that outlives its
    // revocation nor remove the operators' passwords.
    let password_key = keys.iter().find(|k| !k.current).unwrap().name.clone();
    assert!(matches!(
        by_file.add_key("mine", KdfParams::weak()),
        Err(StoreError::KeyRefused(_))
    ));
    assert!(matches!(
        by_file.remove_key(&password_key),
        Err(StoreError::KeyRefused(_))
    ));
    // The password still opens (only password keys are tried: one).
    assert!(matches!(
        open(&mem, "wrong"),
        Err(StoreError::WrongPassword { tried: 1, .. })
    ));
    // A repository that only key files open says so to a password (exit 19, not damage).
    let only_files = mem.fork();
    only_files.delete(Kind::Key, &password_key).unwrap();
    assert!(matches!(
        open(&only_files, "pw"),
        Err(StoreError::OnlyKeyFiles { key_files: 1 })
    ));
    // Another repository does not open with it.
    let other = MemBackend::new();
    Repository::init(&other, encrypted()).unwrap();
    assert!(matches!(
        with_file(&other),
        Err(StoreError::KeyFileRefused { .. })
    ));
    // Removed, it opens nothing.
    repo.remove_key(&name).unwrap();
    match with_file(&mem) {
        Err(e @ StoreError::KeyFileRefused { .. }) => {
            assert!(e.to_string().contains("revoked"), "{e}")
        }
        Err(e) => panic!("a removed key file is refused as such: {e}"),
        Ok(_) => panic!("a removed key file opens nothing"),
    }
}

#[test]
fn blobs_read_back_verified_and_a_damaged_one_is_named() {
    let mem = MemBackend::new();
    Repository::init(&mem, encrypted()).unwrap();
    let repo = open(&mem, "pw").unwrap();
    let data: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 10_000 + usize::from(i)]).collect();
    let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    let (pack, entries) = store(&repo, &refs);
    for raw in &data {
        assert_eq!(
            &repo.read_blob(&repo.blob_id(raw), BlobKind::Data).unwrap(),
            raw
        );
    }
    // One stored byte flipped: that blob fails by name, the others read on.
    flip(
        &mem,
        Kind::Pack,
        &pack.to_hex(),
        entries[2].offset as usize + 60,
    );
    let mut results = Vec::new();
    repo.read_blobs(
        pack,
        &entries,
        PackGone::Fail,
        &mut Vec::new(),
        |i, blob| {
            let mut out = vec![0u8; entries[i].raw_len as usize];
            results.push(blob.and_then(|b| b.open_into(&mut out)).map(|()| out));
            Ok::<(), StoreError>(())
        },
    )
    .unwrap();
    assert_eq!(results.len(), 5, "every blob is handed out");
    for (i, r) in results.iter().enumerate() {
        match r {
            Ok(out) => assert_eq!(out, &data[i]),
            Err(StoreError::BlobCorrupt { id, .. }) => assert_eq!((i, *id), (2, entries[2].id)),
            Err(e) => panic!("blob {i}: {e}"),
        }
    }
    assert_eq!(results.iter().filter(|r| r.is_err()).count(), 1);
}

#[test]
fn entries_out_of_order_or_overlapping_are_an_error_not_a_panic() {
    let (_mem, repo) = unencrypted();
    let (pack, entries) = store(&repo, &[&[1u8; 3000], &[2u8; 3000]]);
    let reversed: Vec<PackEntry> = entries.iter().rev().copied().collect();
    let mut overlapping = entries.clone();
    overlapping[1].offset -= 1;
    for bad in [reversed, overlapping] {
        let r = repo.read_blobs(pack, &bad, PackGone::Fail, &mut Vec::new(), |_, _| {
            Ok::<(), StoreError>(())
        });
        assert!(matches!(r, Err(StoreError::Corrupt { .. })), "{r:?}");
    }
}

#[test]
fn a_reader_follows_a_blob_that_prune_moved() {
    let (mem, reader) = unencrypted();
    let raw = vec![7u8; 50_000];
    let (old, entries) = store(&reader, &[&raw]);
    // A prune elsewhere copies the blob into a new pack, indexes it, and deletes the old pack
    // (its index file too): the reader's index still points at the old one.
    let pruner = open(&mem, "").unwrap();
    let (new, _) = store(&pruner, &[&raw]);
    for f in pruner.index_files().unwrap() {
        let file = pruner.read_index_file(&f).unwrap();
        if file.packs.iter().any(|(p, _)| *p == old) {
            pruner.remove_index_file(&f).unwrap();
        }
    }
    mem.delete(Kind::Pack, &old.to_hex()).unwrap();
    let read = |gone| {
        let mut from = None;
        reader
            .read_blobs(old, &entries, gone, &mut Vec::new(), |_, blob| {
                let blob = blob?;
                from = Some(blob.pack());
                blob.open_into(&mut vec![0u8; raw.len()])
            })
            .map(|()| from)
    };
    assert!(matches!(
        read(PackGone::Fail),
        Err(StoreError::PackMissing { .. })
    ));
    assert_eq!(read(PackGone::FollowIndex).unwrap(), Some(new));
}

#[test]
fn backups_never_dedup_against_a_marked_pack() {
    let (mem, repo) = unencrypted();
    let raw = vec![3u8; 1000];
    let (pack, _) = store(&repo, &[&raw]);
    let id = repo.blob_id(&raw);
    assert!(repo.dedup_hit(&id).unwrap());
    repo.write_marks(&Marks {
        packs: vec![(pack, MarkReason::Unused)],
    })
    .unwrap();
    repo.refresh_index().unwrap();
    assert!(repo.is_marked(&pack));
    assert!(
        !repo.dedup_hit(&id).unwrap(),
        "a marked pack may go: store the blob again"
    );
    // A marks object that cannot be read: any pack might be marked, so nothing is safe.
    mem.write_once(Kind::Marks, "damaged", b"garbage").unwrap();
    repo.refresh_index().unwrap();
    assert!(
        repo.dedup_hit(&ChunkId([1; 32])).is_ok(),
        "an unknown blob is no hit either way"
    );
    assert!(matches!(
        repo.dedup_hit(&id),
        Err(StoreError::Corrupt { .. })
    ));
}

/// A manifest of an empty source, tagged `nightly`, made at `time_ns`.
fn empty_manifest(repo: &Repository, time_ns: i64) -> Manifest {
    Manifest {
        time_ns,
        source: "disk".into(),
        host: "h".into(),
        tags: vec!["nightly".into()],
        size: 0,
        segment_size: repo.config().segment_size,
        parent: None,
        figures: Default::default(),
        trees: Vec::new(),
        extensions: Vec::new(),
    }
}

#[test]
fn snapshots_are_written_listed_resolved_and_removed() {
    let mem = MemBackend::new();
    Repository::init(&mem, encrypted()).unwrap();
    let repo = open(&mem, "pw").unwrap();
    let manifest = |time_ns| empty_manifest(&repo, time_ns);
    let old = repo.write_manifest(&manifest(1)).unwrap();
    let new = repo.write_manifest(&manifest(2)).unwrap();
    assert_eq!(repo.resolve_snapshot("latest").unwrap(), new);
    assert_eq!(repo.resolve_snapshot(&old.to_hex()[..12]).unwrap(), old);
    assert_eq!(repo.load_manifest(&old).unwrap(), manifest(1));
    repo.remove_snapshot(&old).unwrap();
    assert_eq!(repo.snapshot_ids().unwrap(), vec![new]);
    assert!(matches!(
        repo.remove_snapshot(&old),
        Err(StoreError::SnapshotNotFound(_))
    ));
    // A manifest whose bytes changed no longer matches its id.
    flip(&mem, Kind::Snapshot, &new.to_hex(), 10);
    assert!(matches!(
        repo.load_manifest(&new),
        Err(StoreError::Corrupt { .. })
    ));
}

#[test]
fn rows_number_every_blob_once_in_the_table_and_the_overlay() {
    let mem = MemBackend::new();
    Repository::init(&mem, InitOptions::default()).unwrap();
    let writer = open(&mem, "").unwrap();
    let blob = |i: u32| i.to_le_bytes().repeat(300);
    let first: Vec<Vec<u8>> = (0..40).map(blob).collect();
    store(
        &writer,
        &first.iter().map(Vec::as_slice).collect::<Vec<_>>(),
    );
    // Opened now, the reader folds what exists into a table; what comes after stays in its
    // overlay until it grows.
    let reader = open(&mem, "").unwrap();
    let later: Vec<Vec<u8>> = (40..70).map(blob).collect();
    store(
        &writer,
        &later.iter().map(Vec::as_slice).collect::<Vec<_>>(),
    );
    reader.refresh_index().unwrap();
    let index = reader.index().unwrap();
    let rows = index.rows().expect("a sound table");
    assert_eq!(rows.len(), 70);
    assert_eq!(rows.len(), index.len() as u64);
    let mut seen = std::collections::BTreeSet::new();
    for raw in first.iter().chain(&later) {
        let id = reader.blob_id(raw);
        let row = rows.row(&id).expect("every stored blob has a row");
        assert!(seen.insert(row), "row {row} given twice");
        assert_eq!(rows.entry(row), Some(reader.locate(&id).unwrap()));
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        (0..70).collect::<Vec<_>>()
    );
    assert_eq!(rows.row(&reader.blob_id(b"never stored")), None);
    let mut ids: Vec<ChunkId> = first
        .iter()
        .chain(&later)
        .map(|r| reader.blob_id(r))
        .collect();
    ids.push(reader.blob_id(b"never stored"));
    ids.sort();
    let mut batch = Vec::new();
    rows.rows_sorted_by(&ids, |id| id, |i, row| batch.push((i, row)));
    let one_by_one: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (i, rows.row(id)))
        .collect();
    assert_eq!(batch, one_by_one);
    assert_eq!(rows.entry(70), None);
}

#[test]
fn large_and_many_index_files_reach_the_table_through_sorted_runs_and_every_blob_is_found() {
    let (mem, writer) = unencrypted();
    // One file above the fold threshold (as prune and repair write them), one small one that
    // names a blob of the large one again, in another pack.
    let (big, small) = (PackId([1; 16]), PackId([2; 16]));
    let n = 70_000u32;
    writer
        .write_index_file(vec![(big, (0..n).map(entry).collect())])
        .unwrap();
    writer
        .write_index_file(vec![(small, vec![entry(5), entry(n)])])
        .unwrap();
    // And several of 3000 entries: a new reader reads them all into sorted runs (of 4096
    // entries in unit tests), written as temporary tables and merged into one.
    let more = 100_000..115_000u32;
    for (k, chunk) in more.clone().collect::<Vec<_>>().chunks(3000).enumerate() {
        let pack = PackId([10 + k as u8; 16]);
        writer
            .write_index_file(vec![(pack, chunk.iter().map(|i| entry(*i)).collect())])
            .unwrap();
    }
    for repo in [&writer, &open(&mem, "").unwrap()] {
        let index = repo.index().unwrap();
        assert_eq!(index.len(), n as usize + 1 + more.len());
        for i in [0, 5, 12_345, n - 1] {
            let found = repo.locate(&entry(i).id).unwrap();
            assert_eq!(found.entry, entry(i));
            assert!(found.pack == big || (i == 5 && found.pack == small));
        }
        assert_eq!(repo.locate(&entry(n).id).unwrap().pack, small);
        for i in more.clone().step_by(997) {
            assert_eq!(repo.locate(&entry(i).id).unwrap().entry, entry(i));
        }
        // Nothing of the runs is left in the cache folder.
        let left: Vec<_> = std::fs::read_dir(index.cache_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| !n.to_string_lossy().ends_with(".tbl"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}

/// Entry `i` of made-up index files: a blob of 100 bytes.
fn entry(i: u32) -> PackEntry {
    PackEntry {
        id: ChunkId(*blake3::hash(&i.to_le_bytes()).as_bytes()),
        kind: BlobKind::Data,
        compression: crate::blob::Compression::None,
        offset: 16 + u64::from(i % 1000) * 100,
        stored_len: 100,
        raw_len: 100,
    }
}

/// A repository of 3000 small blobs, and a second handle on it whose cache holds a table of
/// them.
fn a_reader_with_a_table() -> (MemBackend, Repository, Repository, Vec<Vec<u8>>) {
    let (mem, writer) = unencrypted();
    let blobs: Vec<Vec<u8>> = (0..3000u32).map(|i| i.to_le_bytes().repeat(10)).collect();
    store(
        &writer,
        &blobs.iter().map(Vec::as_slice).collect::<Vec<_>>(),
    );
    let reader = open(&mem, "").unwrap();
    (mem, writer, reader, blobs)
}

/// The tables in a cache folder.
fn cache_tables(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "tbl"))
        .collect()
}

/// Bit rot at byte `at` of a file, under any mapping of it.
fn flip_bit(path: &std::path::Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, at).unwrap();
    f.write_all_at(&[byte[0] ^ 0x40], at).unwrap();
}

#[test]
fn a_table_block_damaged_under_a_reader_is_found_and_the_rows_rebuilt() {
    let (_mem, _writer, reader, blobs) = a_reader_with_a_table();
    let dir = reader.index().unwrap().cache_dir().to_owned();
    let table = cache_tables(&dir).pop().expect("a table");
    // Bit rot in the first entry block, under the reader's mapping.
    flip_bit(
        &table,
        crate::index::table::TABLE_HEADER_LEN as u64 + 32 + 16 + 100,
    );
    // A whole-repository pass checks every block first, finds the damage, and rebuilds the
    // cache.
    assert!(reader.index().unwrap().rows().is_none());
    assert!(!table.exists(), "the damaged table is removed");
    let rows = reader.index_rows().unwrap();
    assert_eq!(rows.len(), 3000);
    for raw in &blobs {
        let id = reader.blob_id(raw);
        assert_eq!(rows.entry(rows.row(&id).unwrap()).unwrap().entry.id, id);
        assert!(reader.locate(&id).is_ok());
    }
}

/// A fold over a table with a damaged entry block (found by the merge itself, which no longer
/// reads the table twice) writes no table that claims the damaged one's index files; the cache
/// is rebuilt and every blob found.
#[test]
fn a_fold_over_a_damaged_table_leaves_no_table_short_of_entries() {
    let (_mem, writer, reader, blobs) = a_reader_with_a_table();
    let dir = reader.index().unwrap().cache_dir().to_owned();
    let table = cache_tables(&dir).pop().expect("a table");
    let (header, old_files) = crate::index::table::Table::peek(&table).unwrap();
    // Inside the second entry block, so that the first one's entries still go by.
    flip_bit(
        &table,
        crate::index::table::TABLE_HEADER_LEN as u64
            + 32 * u64::from(header.files)
            + 16 * u64::from(header.packs)
            + 56 * 1500,
    );
    // An index file large enough to be folded at once.
    let n = 70_000u32;
    writer
        .write_index_file(vec![(PackId([1; 16]), (0..n).map(entry).collect())])
        .unwrap();
    let report = reader.refresh_index().unwrap();
    assert!(
        report.notices.iter().any(|n| n.contains("rebuilding")),
        "{:?}",
        report.notices
    );
    for t in cache_tables(&dir) {
        let t = crate::index::table::Table::open(&t).unwrap();
        assert!(t.check_all(), "a table left in the cache is sound");
        if old_files.iter().all(|f| t.files().any(|g| g == *f)) {
            for raw in &blobs {
                assert!(
                    t.get(&reader.blob_id(raw)).is_some(),
                    "a claimed blob is missing"
                );
            }
        }
    }
    reader.refresh_index().unwrap();
    for raw in &blobs {
        assert!(reader.locate(&reader.blob_id(raw)).is_ok());
    }
    for i in (0..n).step_by(999) {
        assert_eq!(reader.locate(&entry(i).id).unwrap().entry, entry(i));
    }
}

#[test]
fn manifests_are_read_from_the_cache_while_they_hash_to_their_ids_and_trimmed_when_gone() {
    let mem = MemBackend::new();
    Repository::init(&mem, encrypted()).unwrap();
    let repo = open(&mem, "pw").unwrap();
    let cache = tempfile::tempdir().unwrap();
    repo.use_manifest_cache(&CacheLocation::Dir(cache.path().to_owned()));
    let manifest = |time_ns| empty_manifest(&repo, time_ns);
    let a = repo.write_manifest(&manifest(1)).unwrap();
    let b = repo.write_manifest(&manifest(2)).unwrap();
    assert_eq!(repo.snapshots().unwrap().len(), 2);
    let dir = cache
        .path()
        .join(crate::id::to_hex(&repo.config().repo_id))
        .join("snapshots");
    let cached = dir.join(a.to_hex());
    // Sealed, as stored: nothing of the manifest is readable in the cache.
    assert_eq!(
        std::fs::read(&cached).unwrap(),
        mem.read(Kind::Snapshot, &a.to_hex()).unwrap()
    );
    // Read from the cache: the stored object is garbage now, the copy still hashes to the id.
    // What verify reads, the repository as stored, says so.
    flip(&mem, Kind::Snapshot, &a.to_hex(), 10);
    assert_eq!(repo.load_manifest(&a).unwrap(), manifest(1));
    let stored = repo.snapshots_as_stored().unwrap();
    let damaged = stored.iter().find(|(id, _)| *id == a).unwrap();
    assert!(matches!(damaged.1, Err(StoreError::Corrupt { .. })));
    // A damaged copy is not used: the (damaged) stored object is read, and refused.
    let mut bad = std::fs::read(&cached).unwrap();
    bad[3] ^= 1;
    std::fs::write(&cached, bad).unwrap();
    assert!(matches!(
        repo.load_manifest(&a),
        Err(StoreError::Corrupt { .. })
    ));
    // A snapshot forgotten (here or elsewhere) leaves the cache at the next listing, and
    // cannot be pinned from its cached copy (a pin checks the repository itself).
    repo.remove_snapshot(&b).unwrap();
    assert!(dir.join(b.to_hex()).exists());
    let lock = repo
        .lock(
            crate::lock::LockKind::Pin,
            "test",
            crate::lock::LockTiming::default(),
        )
        .unwrap();
    assert!(matches!(
        repo.pin_snapshot(&lock, &b),
        Err(StoreError::SnapshotNotFound(_))
    ));
    repo.snapshots().unwrap();
    assert!(!dir.join(b.to_hex()).exists());
}

/// A killed process's half-written table or run is removed by the next open once nobody has
/// written it for an hour; one written a moment ago (another process's, perhaps) is left.
#[test]
fn leftovers_of_killed_table_writers_are_removed_and_live_ones_kept() {
    let (mem, writer) = unencrypted();
    store(&writer, &[b"one".as_slice(), b"two".as_slice()]);
    let base = tempfile::tempdir().unwrap();
    let open_cached = || open_with_cache(&mem, base.path());
    let dir = open_cached().index().unwrap().cache_dir().to_owned();
    assert_eq!(cache_tables(&dir).len(), 1);
    let old = dir.join(".0123.tbl.0123456789abcdef.tmp");
    let fresh = dir.join(".run-fedcba9876543210.tmp");
    for f in [&old, &fresh] {
        std::fs::write(f, b"half a table").unwrap();
    }
    let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(two_hours_ago)
        .unwrap();
    let _again = open_cached();
    assert!(!old.exists(), "an hour-old leftover is removed");
    assert!(fresh.exists(), "a file being written is left alone");
    assert_eq!(cache_tables(&dir).len(), 1, "the table stays");
}

/// Index files that appear after a large table are folded into a delta table beside it, which
/// the next fold rewrites while the base stays as it is; every blob is found by one lookup, in
/// a sorted batch and by row, with no id in two tables; a new process uses both tables; and
/// once the delta would hold more than a sixteenth of the base, one table holds everything.
#[test]
fn index_files_after_a_large_table_fold_into_a_delta_beside_it() {
    use std::os::unix::fs::MetadataExt;
    let (mem, writer) = unencrypted();
    // The base: 70,000 entries, folded at once. (Unit tests fold the overlay at 4096 entries.)
    writer
        .write_index_file(vec![(PackId([1; 16]), (0..70_000).map(entry).collect())])
        .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let open_cached = || open_with_cache(&mem, cache.path());
    let reader = open_cached();
    let dir = reader.index().unwrap().cache_dir().to_owned();
    let [base] = cache_tables(&dir).try_into().unwrap();
    let inode = std::fs::metadata(&base).unwrap().ino();
    // 4100 new entries, 2000 of them blobs the base holds already (a second copy, in another
    // pack): folded into a delta, without those.
    let add = |range: std::ops::Range<u32>, pack: u8| {
        writer
            .write_index_file(vec![(PackId([pack; 16]), range.map(entry).collect())])
            .unwrap();
    };
    add(68_000..70_000, 2);
    add(100_000..102_100, 3);
    reader.refresh_index().unwrap();
    let tables = cache_tables(&dir);
    assert_eq!(tables.len(), 2, "a base and a delta");
    assert_eq!(
        std::fs::metadata(&base).unwrap().ino(),
        inode,
        "the base stays"
    );
    let delta = tables.iter().find(|t| **t != base).unwrap().clone();
    let delta_len = crate::index::table::Table::open(&delta).unwrap().len();
    assert_eq!(delta_len, 2100, "the delta leaves out what the base holds");
    let found = |repo: &Repository, ids: &[u32]| {
        let index = repo.index().unwrap();
        let rows = repo.index_rows().unwrap();
        assert_eq!(rows.len(), index.len() as u64);
        let mut sorted: Vec<ChunkId> = ids.iter().map(|i| entry(*i).id).collect();
        sorted.sort();
        let mut batch = Vec::new();
        index.get_sorted(&sorted, |i, e| batch.push((i, e.map(|e| e.entry.id))));
        let mut by_row = Vec::new();
        rows.rows_sorted_by(&sorted, |id| id, |i, r| by_row.push((i, r)));
        for (i, id) in sorted.iter().enumerate() {
            assert_eq!(index.get(id).map(|e| e.entry.id), Some(*id));
            assert_eq!(batch[i], (i, Some(*id)));
            let row = rows.row(id).expect("a row");
            assert_eq!(by_row[i], (i, Some(row)));
            assert_eq!(rows.entry(row).unwrap().entry.id, *id);
        }
    };
    let sample: Vec<u32> = (0..70_000)
        .step_by(97)
        .chain((100_000..102_100).step_by(7))
        .collect();
    found(&reader, &sample);
    assert_eq!(reader.index().unwrap().len(), 72_100, "no id counted twice");
    // The writer took its own files into its overlay without looking them up (2000 of those
    // ids are in its base), and folded them into a delta the same way.
    let own = writer.index().unwrap().cache_dir().to_owned();
    assert_eq!(cache_tables(&own).len(), 2, "the writer's base and delta");
    assert_eq!(writer.index().unwrap().len(), 72_100);
    found(&writer, &sample);
    // A new process picks both tables.
    let again = open_cached();
    assert_eq!(again.index().unwrap().len(), 72_100);
    found(&again, &sample);
    // Another 4100: the delta would hold 8200, more than 70,000 / 16: one table again.
    add(200_000..204_100, 4);
    again.refresh_index().unwrap();
    let [merged] = cache_tables(&dir).try_into().unwrap();
    assert!(merged != base && merged != delta);
    assert_eq!(again.index().unwrap().len(), 76_200);
    found(
        &again,
        &sample
            .iter()
            .copied()
            .chain((200_000..204_100).step_by(13))
            .collect::<Vec<_>>(),
    );
}
