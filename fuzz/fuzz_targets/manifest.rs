//! Decodes arbitrary bytes as a snapshot manifest; a manifest that decodes encodes back to its bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(m) = sbk_store::Manifest::decode(data) {
        assert_eq!(m.encode(), data);
    }
});
