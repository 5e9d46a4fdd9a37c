//! Disk images extracted whole (sbk_engine::fuzz_extract): every partition's tree written into
//! a fresh directory; no panic, and nothing written outside it. Seeds: fuzz/corpus/disk_image.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sbk_engine::fuzz_extract(data));
