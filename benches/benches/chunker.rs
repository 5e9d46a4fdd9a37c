//! The chunking stage: zero detection and FastCDC over one segment, per data kind, beside a
//! memcpy of the same bytes; and segments chunked in parallel across the machine's cores.
// criterion_group! generates public functions that cannot carry docs.
#![allow(missing_docs)]

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use rayon::prelude::*;
use sbk_benches::{mixed, random, text_like};
use sbk_chunker::{is_zero, split_segment, ChunkerParams, ZERO_BLOCK};

const SEGMENT: usize = 16 << 20;

/// The repository's default chunker parameters (the seed is per repository; any will do).
fn params() -> ChunkerParams {
    ChunkerParams::for_average(sbk_store::DEFAULT_CHUNK_AVG, 0x5eed)
        .expect("the default parameters are valid")
}

fn chunker(c: &mut Criterion) {
    let p = params();
    let mut g = c.benchmark_group("chunker");
    g.throughput(Throughput::Bytes(SEGMENT as u64));
    for (name, data) in [
        ("random", random(SEGMENT, 1)),
        ("text", text_like(SEGMENT, 2)),
        ("mixed", mixed(SEGMENT, 3)),
    ] {
        g.bench_function(format!("segment/{name}"), |b| {
            b.iter(|| split_segment(black_box(&data), &p))
        });
    }
    let data = random(SEGMENT, 1);
    let mut dst = vec![0u8; SEGMENT];
    g.bench_function("baseline/memcpy", |b| {
        b.iter(|| dst.copy_from_slice(black_box(&data)))
    });
    g.finish();

    let segments: Vec<Vec<u8>> = (0..8).map(|i| mixed(SEGMENT, i)).collect();
    let mut g = c.benchmark_group("chunker-parallel");
    g.throughput(Throughput::Bytes((segments.len() * SEGMENT) as u64));
    g.bench_function("segments/mixed", |b| {
        b.iter(|| {
            segments
                .par_iter()
                .map(|s| split_segment(s, &p).len())
                .sum::<usize>()
        })
    });
    g.finish();
}

fn zero_detector(c: &mut Criterion) {
    let zeros = vec![0u8; SEGMENT];
    let mut g = c.benchmark_group("zero-detect");
    g.throughput(Throughput::Bytes(SEGMENT as u64));
    g.bench_function("blocks/zeros", |b| {
        b.iter(|| black_box(&zeros).chunks(ZERO_BLOCK).all(is_zero))
    });
    // Data blocks: the common case, where the first bytes already say "not zero".
    let data = random(SEGMENT, 7);
    g.bench_function("blocks/data", |b| {
        b.iter(|| {
            black_box(&data)
                .chunks(ZERO_BLOCK)
                .filter(|b| is_zero(b))
                .count()
        })
    });
    let mut dst = vec![1u8; SEGMENT];
    g.bench_function("baseline/memcpy", |b| {
        b.iter(|| dst.copy_from_slice(black_box(&zeros)))
    });
    g.finish();
}

criterion_group!(benches, chunker, zero_detector);
criterion_main!(benches);
