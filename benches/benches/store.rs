//! The per-chunk stages: keyed BLAKE3 ids, zstd compression and decompression, beside a memcpy.
// criterion_group! generates public functions that cannot carry docs.
#![allow(missing_docs)]

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use sbk_benches::{mixed, random, text_like};
use sbk_store::{decode_blob_into, encode_blob, BlobKind, ChunkId};

const CHUNK: usize = 1 << 20;

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
        g.bench_function(format!("zstd3-compress/{name}"), |b| {
            b.iter(|| {
                encode_blob(ChunkId([0; 32]), BlobKind::Data, black_box(&data), 3)
                    .expect("compression works")
            })
        });
        let blob =
            encode_blob(ChunkId([0; 32]), BlobKind::Data, &data, 3).expect("compression works");
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

criterion_group!(benches, stages);
criterion_main!(benches);
