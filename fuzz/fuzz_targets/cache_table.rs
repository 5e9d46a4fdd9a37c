//! Fuzzes the cache_table decoder through sbk_store::fuzz::cache_table (never a panic).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sbk_store::fuzz::cache_table(data));
