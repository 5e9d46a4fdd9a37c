//! Filesystem images without a partition table (sbk_diskfs::fuzz::filesystem_image), walked
//! whole; no panic, no hang on any bytes. Seeded with small ext2 and ext4 images.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sbk_diskfs::fuzz::filesystem_image(data));
