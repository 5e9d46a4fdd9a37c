//! Fuzzes the blob_frame decoder through sbk_store::fuzz::blob_frame (never a panic; what decodes re-encodes).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sbk_store::fuzz::blob_frame(data));
