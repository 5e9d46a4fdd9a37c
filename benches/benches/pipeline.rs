//! The whole pipelines on a real file: backup into a fresh repository, a second backup of the
//! same file (the dedup hit path), each beside an O_DIRECT read of the same file, and restore to
//! a file beside a plain write and fsync of the same bytes, all measured in the same run (a
//! restore is bound by its writes, a backup by its reads).
// criterion_group! generates public functions that cannot carry docs.
#![allow(missing_docs)]

use std::io::Write;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sbk_benches::mixed;
use sbk_engine::{
    backup, restore, BackupOptions, NoProgress, RestoreOptions, RestoreTarget, Source,
};
use sbk_store::{CacheLocation, InitOptions, Lock, LockKind, LockTiming, Repository};

const IMAGE: usize = 256 << 20;

fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// A shared lock, as `sbk backup` holds one.
fn locked(repo: &Repository) -> Lock {
    repo.lock(LockKind::Shared, "bench", LockTiming::default())
        .expect("the lock is taken")
}

fn opts() -> BackupOptions {
    BackupOptions {
        threads: threads(),
        host: "bench".into(),
        tags: vec![],
        source_name: None,
        cbt_token: None,
        changed: None,
    }
}

/// Reads the whole file through O_DIRECT in segment-sized reads: the raw baseline.
fn raw_read(path: &Path) -> u64 {
    let mut s = Source::open(path).expect("the image opens");
    let mut buf = memmap2::MmapMut::map_anon(16 << 20).expect("an aligned buffer");
    let mut total = 0;
    let size = s.size();
    let mut off = 0;
    while off < size {
        let len = (size - off).min(16 << 20);
        total += s
            .read_segment(off..off + len, &mut buf)
            .expect("the read works")
            .unwrap_or(0);
        off += len;
    }
    total
}

fn pipeline(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let image = dir.path().join("image");
    let bytes = mixed(IMAGE, 42);
    std::fs::write(&image, &bytes).expect("the image is written");
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Bytes(IMAGE as u64));
    g.sample_size(10);

    g.bench_function("baseline/odirect-read", |b| b.iter(|| raw_read(&image)));
    let sources = [image.clone().into()];
    let run_backup =
        |repo: &Repository, lock: &Lock| backup(repo, lock, &sources, &opts(), &NoProgress);

    g.bench_function("backup/first", |b| {
        b.iter_with_setup(
            || {
                let repo = dir.path().join(format!("repo-{}", std::process::id()));
                let _ = std::fs::remove_dir_all(&repo);
                Repository::init_local(&repo, InitOptions::default()).expect("init works");
                let repo = Repository::open_local(&repo, &CacheLocation::Temporary, None)
                    .expect("open works");
                let lock = locked(&repo);
                (repo, lock)
            },
            |(repo, lock)| run_backup(&repo, &lock).expect("backup runs"),
        )
    });

    let repo_path = dir.path().join("repo-warm");
    Repository::init_local(&repo_path, InitOptions::default()).expect("init works");
    let repo =
        Repository::open_local(&repo_path, &CacheLocation::Temporary, None).expect("open works");
    let lock = locked(&repo);
    let first = run_backup(&repo, &lock).expect("backup runs");
    let snapshot = first[0].as_ref().expect("the backup succeeds").snapshot;
    g.bench_function("backup/unchanged", |b| b.iter(|| run_backup(&repo, &lock)));

    let raw = dir.path().join("raw");
    g.bench_function("baseline_write-fsync", |b| {
        b.iter(|| {
            let _ = std::fs::remove_file(&raw);
            let mut f = std::fs::File::create(&raw).expect("a file is created");
            f.write_all(&bytes).expect("the bytes are written");
            f.sync_all().expect("fsync works");
        })
    });
    let out = dir.path().join("restored");
    g.bench_function("restore/file", |b| {
        b.iter(|| {
            let _ = std::fs::remove_file(&out);
            restore(
                &repo,
                &snapshot,
                &RestoreTarget::Path(out.clone()),
                &RestoreOptions {
                    threads: threads(),
                    force: true,
                },
                &NoProgress,
            )
            .expect("restore works")
        })
    });
    g.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
