//! Fuzzes the manifest decoder through sbk_store::fuzz::manifest (never a panic; what decodes re-encodes).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sbk_store::fuzz::manifest(data));
