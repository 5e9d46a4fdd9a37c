//! Decodes arbitrary bytes as a segment tree (the first 8 bytes give the segment length); a
//! tree that decodes encodes back to the same bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (len, tree) = data.split_at(8);
    let len = u64::from_le_bytes(len.try_into().expect("eight bytes"));
    if let Ok(extents) = sbk_store::decode_tree(tree, len) {
        assert_eq!(sbk_store::encode_tree(&extents), tree);
    }
});
