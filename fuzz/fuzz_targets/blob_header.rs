//! Fuzzes the blob_header decoder through sbk_store::fuzz::blob_header (never a panic; what decodes re-encodes).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sbk_store::fuzz::blob_header(data));
