//! The per-chunk stages: keyed BLAKE3 ids, zstd compression and decompression, beside a memcpy;
//! pack writing beside a plain write+fsync of the same bytes; opening the index cold (building
//! the cache table from index files) and warm; index lookups (hits and misses) beside the same
//! lookups in an in-memory hash set.
// criterion_group! generates public functions that cannot carry docs.
#![allow(missing_docs)]

use std::collections::HashSet;
use std::io::Write;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use sbk_benches::{mixed, random, text_like};
use sbk_store::{
    decode_blob_into, encode_blob, BlobKind, CacheLocation, ChunkId, Compression, InitOptions,
    Kind, PackEntry, PackId, Repository, DEFAULT_ZSTD_LEVEL,
};

/// The repository's default average chunk size.
const CHUNK: usize = sbk_store::DEFAULT_CHUNK_AVG as usize;

fn stages(c: &mut Criterion) {
    let key = [7u8; 32];
    let mut g = c.benchmark_group("chunk");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    for (name, data) in [
        ("random", random(CHUNK, 1)),
        ("text", text_like(CHUNK, 2)),
        ("mixed", mixed(CHUNK, 3)),
    ] {
        g.bench_function(format!("blake3-keyed/{name}"), |b| {
            b.iter(|| blake3::keyed_hash(&key, black_box(&data)))
        });
        g.bench_function(format!("zstd-compress/{name}"), |b| {
            b.iter(|| {
                encode_blob(
                    ChunkId([0; 32]),
                    BlobKind::Data,
                    black_box(&data),
                    DEFAULT_ZSTD_LEVEL,
                )
                .expect("compression works")
            })
        });
        let blob = encode_blob(ChunkId([0; 32]), BlobKind::Data, &data, DEFAULT_ZSTD_LEVEL)
            .expect("compression works");
        let mut out = vec![0u8; CHUNK];
        g.bench_function(format!("zstd-decompress/{name}"), |b| {
            b.iter(|| {
                decode_blob_into(blob.header.compression, black_box(&blob.data), &mut out)
                    .expect("round trip")
            })
        });
    }
    let data = random(CHUNK, 1);
    let mut dst = vec![0u8; CHUNK];
    g.bench_function("baseline/memcpy", |b| {
        b.iter(|| dst.copy_from_slice(black_box(&data)))
    });
    g.finish();
}

fn pack_writing(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let repo = dir.path().join("repo");
    Repository::init_local(&repo, InitOptions::default()).expect("init works");
    let repo = Repository::open_local(&repo, &CacheLocation::Temporary, None).expect("opens");
    let blobs: Vec<_> = (0..32u8)
        .map(|i| {
            encode_blob(
                ChunkId([i; 32]),
                BlobKind::Data,
                &mixed(1 << 20, u64::from(i)),
                1,
            )
            .expect("compression works")
        })
        .collect();
    let bytes: Vec<u8> = blobs
        .iter()
        .flat_map(|b| b.header.encode().into_iter().chain(b.data.iter().copied()))
        .collect();
    let mut g = c.benchmark_group("pack");
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    g.sample_size(10);
    g.bench_function("write-and-seal", |b| {
        b.iter(|| {
            let mut w = repo.new_pack().expect("a pack is created");
            for blob in &blobs {
                w.add(blob).expect("the blob is written");
            }
            let (id, _) = w.finish().expect("the pack is sealed");
            repo.backend()
                .delete(Kind::Pack, &id.to_hex())
                .expect("the pack is removed");
        })
    });
    let raw = dir.path().join("raw");
    g.bench_function("baseline_write-fsync", |b| {
        b.iter(|| {
            let mut f = std::fs::File::create(&raw).expect("a file is created");
            f.write_all(&bytes).expect("the bytes are written");
            f.sync_all().expect("fsync works");
        })
    });
    g.finish();
}

fn index_lookups(c: &mut Criterion) {
    const ENTRIES: u32 = 200_000;
    const LOOKUPS: usize = 1000;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("repo");
    Repository::init_local(&path, InitOptions::default()).expect("init works");
    let id = |i: u32| ChunkId(*blake3::hash(&i.to_le_bytes()).as_bytes());
    let entries: Vec<PackEntry> = (0..ENTRIES)
        .map(|i| PackEntry {
            id: id(i),
            kind: BlobKind::Data,
            compression: Compression::Zstd,
            offset: 16 + u64::from(i) * 100,
            stored_len: 60,
            raw_len: 100,
        })
        .collect();
    {
        // Index files as backups write them: one per run, 20 runs.
        let writer = Repository::open_local(&path, &CacheLocation::Temporary, None).expect("opens");
        for chunk in entries.chunks(10_000) {
            writer
                .write_index_file(vec![(PackId([chunk[0].id.0[0]; 16]), chunk.to_vec())])
                .expect("the index file is written");
        }
    }
    // Cold: a new process builds its cache table from the index files; warm: it reuses it.
    let cache = CacheLocation::Dir(dir.path().join("cache"));
    let mut g = c.benchmark_group("index");
    g.sample_size(10);
    g.bench_function("open_cold", |b| {
        b.iter(|| {
            let _ = std::fs::remove_dir_all(dir.path().join("cache"));
            Repository::open_local(&path, &cache, None).expect("opens")
        })
    });
    g.bench_function("open_warm", |b| {
        b.iter(|| Repository::open_local(&path, &cache, None).expect("opens"))
    });
    g.finish();
    let repo = Repository::open_local(&path, &cache, None).expect("opens");
    let index = repo.index().expect("loaded");
    let hits: Vec<ChunkId> = (0..LOOKUPS as u32).map(|i| id(i * 197 % ENTRIES)).collect();
    let misses: Vec<ChunkId> = (0..LOOKUPS as u32).map(|i| id(ENTRIES + i)).collect();
    let set: HashSet<ChunkId> = entries.iter().map(|e| e.id).collect();
    let mut g = c.benchmark_group("index");
    g.throughput(Throughput::Elements(LOOKUPS as u64));
    g.bench_function("lookup_hit", |b| {
        b.iter(|| hits.iter().filter(|i| index.contains(i)).count())
    });
    g.bench_function("lookup_miss", |b| {
        b.iter(|| misses.iter().filter(|i| index.contains(i)).count())
    });
    g.bench_function("baseline_hashset", |b| {
        b.iter(|| {
            hits.iter()
                .chain(&misses)
                .step_by(2)
                .filter(|i| set.contains(*i))
                .count()
        })
    });
    g.finish();
}

criterion_group!(benches, stages, pack_writing, index_lookups);
criterion_main!(benches);
