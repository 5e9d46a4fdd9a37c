//! The test vectors of docs/format.md: each structure, encoded from the values the document
//! lists, must give exactly the hex the document shows.

use sbk_store::{
    BackupFigures, BlobKind, ChunkId, Compression, IndexFile, LockInfo, LockKind, Manifest,
    MarkReason, Marks, PackEntry, PackId, RepoConfig, SnapshotId,
};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn config_vector() {
    let c = RepoConfig {
        version: 2,
        repo_id: [0x11; 16],
        chunk_key: [0x22; 32],
        chunk_min: 65536,
        chunk_avg: 262144,
        chunk_max: 1048576,
        chunk_seed: 0x0123_4567_89ab_cdef,
        zero_min: 65536,
        segment_size: 16 << 20,
        pack_size: 32 << 20,
        zstd_level: 1,
        created: 1_764_000_000,
        features_required: 0,
        features_optional: 0,
        object_lock: None,
        mac: [0; 16],
    };
    assert_eq!(hex(&c.encode()), CONFIG);
    // Version 3: the same under Object Lock, 30 days in compliance mode.
    let locked = RepoConfig {
        version: 3,
        features_required: sbk_store::FEATURE_OBJECT_LOCK,
        object_lock: Some(sbk_store::ObjectLock {
            secs: 2_592_000,
            mode: sbk_store::LockMode::Compliance,
        }),
        ..c
    };
    assert_eq!(hex(&locked.encode()), CONFIG_LOCKED);
}

#[test]
fn index_file_vector() {
    let f = IndexFile {
        packs: vec![(
            PackId([0x33; 16]),
            vec![PackEntry {
                id: ChunkId([0x44; 32]),
                kind: BlobKind::Data,
                compression: Compression::Zstd,
                offset: 16,
                stored_len: 1000,
                raw_len: 4096,
            }],
        )],
        extensions: Vec::new(),
    };
    assert_eq!(hex(&f.encode()), INDEX_FILE);
    assert_eq!(IndexFile::id_of(&f.encode()).to_hex(), INDEX_FILE_NAME);
}

#[test]
fn key_object_vector() {
    let k = sbk_store::KeyObject {
        kdf: sbk_store::Kdf::Argon2id(sbk_store::KdfParams {
            m_kib: 65536,
            t: 12,
            p: 1,
        }),
        salt: [0x77; 16],
        wrap_salt: [0x88; 24],
        wrapped: vec![0x99; 80],
        created: 1_764_000_000,
    };
    assert_eq!(hex(&k.encode()), KEY);
    assert_eq!(sbk_store::KeyObject::decode(&k.encode()).unwrap(), k);
    // A key file's key object: KDF 2, its three parameters zero.
    let f = sbk_store::KeyObject {
        kdf: sbk_store::Kdf::KeyFile,
        ..k
    };
    assert_eq!(hex(&f.encode()), KEY_FOR_FILE);
    assert_eq!(sbk_store::KeyObject::decode(&f.encode()).unwrap(), f);
}

#[test]
fn key_file_vector() {
    let bytes: Vec<u8> = (0..KEY_FILE.len() / 2)
        .map(|i| u8::from_str_radix(&KEY_FILE[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let f = sbk_store::KeyFile::decode(&bytes).unwrap();
    assert_eq!((f.repo_id, f.key_name), ([0x11; 16], [0x44; 16]));
    assert_eq!(f.name(), "44".repeat(16));
    assert_eq!(hex(&f.encode()), KEY_FILE);
}

#[test]
fn lock_vector() {
    let l = LockInfo {
        kind: LockKind::Shared,
        host: "mover1".into(),
        pid: 4242,
        time: 1_764_000_000,
        lease_secs: 1800,
        started: 1_764_000_001,
        purpose: "backup".into(),
    };
    assert_eq!(hex(&l.encode()), LOCK);
}

#[test]
fn marks_vector() {
    let m = Marks {
        packs: vec![
            (PackId([0x33; 16]), MarkReason::Unused),
            (PackId([0x44; 16]), MarkReason::Repacked),
        ],
    };
    assert_eq!(hex(&m.encode()), MARKS);
    assert_eq!(Marks::decode(&m.encode()).unwrap(), m);
}

#[test]
fn manifest_vector() {
    let m = Manifest {
        time_ns: 1_764_000_000_000_000_000,
        source: "/dev/vg/snap".into(),
        host: "db1".into(),
        tags: vec!["nightly".into()],
        size: 4096,
        segment_size: 16 << 20,
        parent: Some(SnapshotId([0x55; 32])),
        figures: BackupFigures {
            bytes_read: 4096,
            bytes_zero: 0,
            new_raw: 4096,
            new_stored: 1048,
            chunks: 1,
            new_chunks: 1,
            duration_ms: 7,
        },
        trees: vec![ChunkId([0x66; 32])],
        extensions: Vec::new(),
    };
    assert_eq!(hex(&m.encode()), MANIFEST);
}

const CONFIG: &str = "53424b5245504f0002000000111111111111111111111111111111112222222222222222222222222222222222222222222222222222222222222222000001000000040000001000efcdab896745230100000100000000010000000000000002000000000100000000812469000000000000000000000000000000000000000000000000000000000000000000000000114293fc399eb82e708cdbc883535414";
const CONFIG_LOCKED: &str = "53424b5245504f0003000000111111111111111111111111111111112222222222222222222222222222222222222222222222222222222222222222000001000000040000001000efcdab8967452301000001000000000100000000000000020000000001000000008124690000000002000000000000000000000000000000008d2700000000000100000000000000000000000000000000000000000000008e60b288f296065f30f57c953bbbe895";
const INDEX_FILE: &str = "53424b494e44580001000000000000000100000033333333333333333333333333333333010000004444444444444444444444444444444444444444444444444444444444444444010100001000000000000000e803000000100000000044611914b12256f824a01e47fb4e8de7";
const INDEX_FILE_NAME: &str = "d3502074df55dac48df71a172091a49cfd37074dc7c38f4fea5ab5fee491a858";
const MARKS: &str = "53424b4d41524b530100000002000000333333333333333333333333333333330144444444444444444444444444444444035f3719869b8fc01a1d409fbb0f2dc932";
const LOCK: &str = "53424b4c4f434b000400000001921000000081246900000000080700000181246900000000060000006d6f76657231060000006261636b7570dcbf5b292c801622610189175f6d5644";
const MANIFEST: &str = "53424b534e415000020000000000ca67a7fc7a18001000000000000000000001000000000c0000002f6465762f76672f736e61700300000064623101000000070000006e696768746c7901555555555555555555555555555555555555555555555555555555555555555500100000000000000000000000000000001000000000000018040000000000000100000000000000010000000000000007000000000000000100000066666666666666666666666666666666666666666666666666666666666666660000fc8457f2f419c27597386e91702f872c";
const KEY_FOR_FILE: &str = "53424b4b455900000200000002000000000000000000000000000000777777777777777777777777777777778888888888888888888888888888888888888888888888889999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999008124690000000099b7f8bc6b2598854f42731c328b610b";
const KEY_FILE: &str = "53424b4b455946000100000011111111111111111111111111111111444444444444444444444444444444445555555555555555555555555555555555555555555555555555555555555555cf81addee47c228db0ef755b955d3362";
const KEY: &str = "53424b4b455900000100000001000000000001000c0000000100000077777777777777777777777777777777888888888888888888888888888888888888888888888888999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999900812469000000008f6c80759859a87195808fba1a1f1d6e";
