//! The parser of S3 ListObjectVersions answers (sbk_s3::fuzz_versions_listing): no panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sbk_s3::fuzz_versions_listing(data));
