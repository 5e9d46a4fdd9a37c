//! Disk images (sbk_diskfs::fuzz::disk): partition tables, then each partition's filesystem
//! walked; no panic, no hang on any bytes. Seeded with a GPT disk and an MBR disk with logical
//! partitions.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sbk_diskfs::fuzz::disk(data));
