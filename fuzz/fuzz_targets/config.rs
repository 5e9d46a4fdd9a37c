//! Decodes arbitrary bytes as a repository config: a typed error or a config, never a panic; a
//! config that decodes encodes back to the same bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(c) = sbk_store::RepoConfig::decode(data) {
        assert_eq!(c.encode(), data);
    }
});
