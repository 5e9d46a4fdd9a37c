//! Every decoder of bytes an NBD peer sends (sbk_nbd::proto::fuzz_messages): requests, option
//! data (NBD_OPT_GO/INFO, META_CONTEXT), reply headers. No panic; what decodes re-encodes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| sbk_nbd::proto::fuzz_messages(data));
