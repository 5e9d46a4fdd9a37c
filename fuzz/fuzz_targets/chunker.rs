//! Chunker invariants on arbitrary bytes (sbk_chunker::fuzz_split): spans are contiguous, cover
//! the input, respect the maximum size, zero spans hold only zeros, and chunking is deterministic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sbk_chunker::fuzz_split(data));
