//! Fuzzes the index_file decoder through sbk_store::fuzz::index_file (never a panic; what decodes re-encodes).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sbk_store::fuzz::index_file(data));
