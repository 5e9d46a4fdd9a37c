//! Fuzzes the key file decoder through sbk_store::fuzz::key_file (never a panic).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sbk_store::fuzz::key_file(data));
