//! Decodes arbitrary bytes as an index value; a value that decodes encodes back to its bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let id = sbk_store::ChunkId([0; 32]);
    if let Ok(e) = sbk_store::IndexEntry::decode(id, data) {
        assert_eq!(e.encode(), data);
    }
});
