//! Fuzzes the pack_trailer decoder through sbk_store::fuzz::pack_trailer (never a panic; what decodes re-encodes).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sbk_store::fuzz::pack_trailer(data));
