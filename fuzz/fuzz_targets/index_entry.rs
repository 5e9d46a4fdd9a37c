//! Fuzzes the index_entry decoder through sbk_store::fuzz::index_entry (never a panic; what decodes re-encodes).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sbk_store::fuzz::index_entry(data));
