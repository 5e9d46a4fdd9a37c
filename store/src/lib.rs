//! The sbk repository: chunk ids, on-disk formats, pack files, the index cache and snapshot
//! manifests. Every byte this crate writes is specified in docs/format.md; every decoder returns
//! a typed error on bad bytes and never panics.
//!
//! This crate does no chunking and owns no threads; its types are `Sync` so that the engine's
//! pipelines can share one [`Repository`].

mod blob;
mod codec;
mod config;
mod error;
pub mod fuzz;
mod id;
mod index;
mod lock;
mod manifest;
mod pack;
mod repo;

pub use blob::{
    decode_blob_into, encode_blob, BlobHeader, BlobKind, Compression, EncodedBlob, BLOB_HEADER_LEN,
    MAX_BLOB,
};
pub use config::{RepoConfig, CONFIG_LEN, FORMAT_VERSION};
pub use error::{DecodeError, Result, StoreError};
pub use id::{ChunkId, PackId, SnapshotId};
pub use index::{Index, IndexEntry, INDEX_ENTRY_LEN, MAX_SLOTS};
pub use lock::{host_name, list_locks, FoundLock, Lock, LockInfo, LockKind, LEASE_SECS};
pub use manifest::{decode_tree, encode_tree, BackupFigures, Extent, Manifest};
pub use pack::{check_blob_header, read_range, read_trailer, split_blob, PackEntry, PackWriter};
pub use repo::{
    fsync_dir, write_atomic, InitOptions, RebuildReport, Repository, DEFAULT_CHUNK_AVG,
    DEFAULT_ZSTD_LEVEL,
};
