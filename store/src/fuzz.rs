//! Entry points for fuzzing every decoder of on-disk bytes. The cargo-fuzz targets in `fuzz/`
//! call these, and so does the corpus replay test (`store/tests/fuzz_corpus.rs`), so that CI
//! replays the committed corpora on the stable toolchain without libFuzzer. Each function must
//! return normally for any input: a panic is the bug being hunted.

use crate::blob::{decode_blob_into, BlobHeader, Compression};
use crate::config::RepoConfig;
use crate::id::PackId;
use crate::index::file::IndexFile;
use crate::lock::LockInfo;
use crate::manifest::{decode_tree, encode_tree, Manifest};

/// Config: decodes, and re-encodes to the same bytes when it decodes.
pub fn config(data: &[u8]) {
    if let Ok(c) = RepoConfig::decode(data) {
        assert_eq!(c.encode(), data, "a decoded config re-encodes to its bytes");
    }
}

/// Blob header: decodes, and re-encodes to its 48 bytes when it decodes.
pub fn blob_header(data: &[u8]) {
    if let Ok(h) = BlobHeader::decode(data) {
        assert_eq!(&h.encode()[..], &data[..crate::blob::BLOB_HEADER_LEN]);
    }
}

/// Pack trailer: the bytes as the tail of a pack (trailer entries and footer), placed where
/// their own footer says the entries start, so that every check after the footer is reached.
pub fn pack_trailer(data: &[u8]) {
    use crate::pack::{decode_trailer, FOOTER_LEN};
    let plain = crate::crypto::Crypto::Plain;
    let Some(footer) = data.len().checked_sub(FOOTER_LEN).map(|at| &data[at..]) else {
        let _ = decode_trailer(data, 16, PackId([0; 16]), &plain);
        return;
    };
    let entries_offset = u64::from_le_bytes(footer[16..24].try_into().expect("eight bytes"));
    let pack = PackId(footer[24..40].try_into().expect("sixteen bytes"));
    let _ = decode_trailer(data, entries_offset, pack, &plain);
    let _ = decode_trailer(data, entries_offset, pack, &fuzz_crypto());
}

/// Index file: decodes, and re-encodes to its bytes when it decodes.
pub fn index_file(data: &[u8]) {
    if let Ok(f) = IndexFile::decode(data) {
        assert_eq!(f.encode(), data);
    }
}

/// Cache table: the header decodes, and a file of these bytes opens (or is refused), answers
/// a lookup and checks its blocks, without panicking.
pub fn cache_table(data: &[u8]) {
    use crate::index::table::{Table, TableHeader};
    let _ = TableHeader::decode(data);
    let Ok(dir) = tempfile::tempdir() else { return };
    let path = dir.path().join("t.tbl");
    if std::fs::write(&path, data).is_ok() {
        if let Ok(t) = Table::open(&path) {
            let _ = t.get(&crate::id::ChunkId([0x5a; 32]));
            let _ = t.check_all();
            let _ = t.iter().count();
        }
    }
}

/// Manifest (and its extension values): decodes, and re-encodes to its bytes when it decodes.
pub fn manifest(data: &[u8]) {
    if let Ok(m) = Manifest::decode(data) {
        assert_eq!(m.encode(), data);
        // The extension values decode to a typed error or a value, never a panic.
        let _ = m.changed_blocks();
        let _ = m.origin();
    }
    let _ = crate::manifest::Origin::decode(data);
}

/// Segment tree: the first 8 bytes give the segment length, the rest is the tree.
pub fn tree(data: &[u8]) {
    if data.len() < 8 {
        return;
    }
    let (len, tree) = data.split_at(8);
    let len = u64::from_le_bytes(len.try_into().expect("eight bytes"));
    if let Ok(extents) = decode_tree(tree, len) {
        assert_eq!(encode_tree(&extents), tree);
    }
}

/// Stored zstd blob: the first 2 bytes give the claimed raw length.
pub fn blob_frame(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let raw_len = u16::from_le_bytes([data[0], data[1]]) as usize;
    let mut out = vec![0u8; raw_len];
    let _ = decode_blob_into(Compression::Zstd, &data[2..], &mut out);
}

/// Lock file: decodes, and re-encodes to its bytes when it decodes.
pub fn lock(data: &[u8]) {
    if let Ok(l) = LockInfo::decode(data) {
        assert_eq!(l.encode(), data);
    }
}

/// Marks object: decodes, and re-encodes to its bytes when it decodes.
pub fn marks(data: &[u8]) {
    if let Ok(m) = crate::marks::Marks::decode(data) {
        assert_eq!(m.encode(), data);
    }
}

/// The fixed master key the fuzz entry points open sealed bytes with.
fn fuzz_crypto() -> crate::crypto::Crypto {
    crate::crypto::Crypto::sealed(crate::crypto::MasterKey {
        enc: [0x5b; 32],
        chunk: [0x5c; 32],
    })
}

/// Sealed object: opened under a fixed key in every context (never a panic).
pub fn sealed(data: &[u8]) {
    use crate::crypto::SealedFor;
    let c = fuzz_crypto();
    let id = crate::id::ChunkId([1; 32]);
    let _ = c.open(SealedFor::Blob(crate::blob::BlobKind::Data, &id), data);
    let _ = c.open(SealedFor::Object(crate::backend::Kind::Snapshot), data);
}

/// Key object: decodes, and re-encodes to its bytes when it decodes (the KDF is not run).
pub fn key(data: &[u8]) {
    if let Ok(k) = crate::key::KeyObject::decode(data) {
        assert_eq!(k.encode(), data);
    }
}

/// Key file: decodes, and re-encodes to its bytes when it decodes.
pub fn key_file(data: &[u8]) {
    if let Ok(k) = crate::key_file::KeyFile::decode(data) {
        assert_eq!(k.encode(), data);
    }
}
