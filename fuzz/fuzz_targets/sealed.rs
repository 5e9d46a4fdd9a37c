//! Fuzzes the sealed decoder through sbk_store::fuzz::sealed (never a panic).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sbk_store::fuzz::sealed(data));
