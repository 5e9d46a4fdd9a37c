//! Fuzzes the changed-block list parser through sbk_engine::fuzz_changed_list (never a panic).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sbk_engine::fuzz_changed_list(data));
