//! Fuzzes the key decoder through sbk_store::fuzz::key (never a panic).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sbk_store::fuzz::key(data));
