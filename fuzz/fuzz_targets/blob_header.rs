//! Decodes arbitrary bytes as a blob header; a header that decodes encodes back to its bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(h) = sbk_store::BlobHeader::decode(data) {
        assert_eq!(&h.encode()[..], &data[..sbk_store::BLOB_HEADER_LEN]);
    }
});
