//! Chunker invariants on arbitrary bytes: spans are contiguous, cover the input, respect the
//! maximum size, zero spans hold only zeros, and chunking is deterministic.
#![no_main]
use sbk_chunker::{split_segment, ChunkerParams, Span};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let p = ChunkerParams { min: 256, avg: 1024, max: 4096, seed: 1, zero_min: 8192 };
    let spans = split_segment(data, &p);
    let mut pos = 0;
    for s in &spans {
        match *s {
            Span::Zero { offset, len } => {
                assert_eq!(offset, pos);
                assert!(data[offset..offset + len].iter().all(|&b| b == 0));
            }
            Span::Data { offset, len } => {
                assert_eq!(offset, pos);
                assert!(len <= p.max as usize);
            }
        }
        pos += s.len();
    }
    assert_eq!(pos, data.len());
    assert_eq!(spans, split_segment(data, &p));
});
