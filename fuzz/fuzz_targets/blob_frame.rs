//! Decompresses arbitrary bytes as a stored zstd blob of a claimed raw length: a typed error or
//! exactly that many bytes, never a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let raw_len = u16::from_le_bytes([data[0], data[1]]) as usize;
    let mut out = vec![0u8; raw_len];
    let _ = sbk_store::decode_blob_into(sbk_store::Compression::Zstd, &data[2..], &mut out);
});
