//! Overlay maps of `sbk serve --overlay` (sbk_engine::fuzz_overlay_map): no panic on any bytes;
//! what decodes re-encodes to the same bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sbk_engine::fuzz_overlay_map(data));
