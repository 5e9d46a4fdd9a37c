//! Writes arbitrary bytes as a pack file and reads its trailer: a typed error, never a panic.
#![no_main]
use std::io::Write;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut f = tempfile::NamedTempFile::new().expect("a temporary file");
    f.write_all(data).expect("the temporary file is written");
    let pack = sbk_store::PackId([0; 16]);
    let _ = sbk_store::read_trailer(f.path(), pack);
});
