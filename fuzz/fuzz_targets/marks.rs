//! Fuzzes the marks decoder through sbk_store::fuzz::marks (never a panic; what decodes re-encodes).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sbk_store::fuzz::marks(data));
