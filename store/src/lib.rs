//! The sbk repository: chunk ids, on-disk formats, pack files, index files and the local index
//! cache, snapshot manifests, locks, and the storage backends that hold them. Every byte this
//! crate writes to a repository is specified in docs/format.md; every decoder returns a typed
//! error on bad bytes and never panics.
//!
//! This crate does no chunking and owns no worker threads (a held lock owns one refresher);
//! its types are `Sync` so that the engine's pipelines can share one [`Repository`].

pub mod backend;
mod blob;
mod clock;
mod codec;
mod config;
mod crypto;
mod error;
pub mod fuzz;
mod id;
mod index;
mod key;
mod key_file;
mod kind;
mod lock;
mod manifest;
mod marks;
mod pack;
mod repo;

pub use backend::{
    AsOfBackend, Backend, CountingBackend, FaultMode, FaultyBackend, Kind, LocalBackend,
    MemBackend, ObjectInfo, ObjectVersion, ReadCount, Versions, FAULT_ENV,
};
pub use blob::{
    decode_blob_into, encode_blob, BlobHeader, BlobKind, Compression, EncodedBlob, BLOB_HEADER_LEN,
};
pub use clock::{unix_now, unix_now_ns};
pub use codec::Extension;
pub use config::{LockMode, ObjectLock, RepoConfig, FEATURE_OBJECT_LOCK, MAX_OBJECT_LOCK_SECS};
pub use error::{DecodeError, Result, StoreError};
pub use id::{ChunkId, IndexId, PackId, SnapshotId};
pub use index::file::IndexFile;
pub use index::lookups::{Lookups, Record};
pub use index::rows::{RowBits, RowCounts, Rows};
pub use index::{CacheLocation, Index, IndexEntry, IndexReport};
pub use key::{Kdf, KdfParams, KeyObject};
pub use key_file::KeyFile;
pub use lock::{
    holder_id, host_name, list_locks, remove_stale_locks, FoundLock, Liveness, Lock, LockInfo,
    LockKind, LockTiming, LockVerdict,
};
pub use manifest::{encode_tree, BackupFigures, ChangedBlocks, Extent, Manifest, Origin};
pub use marks::{MarkReason, Marks};
pub use pack::{pack_size_of, PackEntry, PackWriter};
pub use repo::{
    ChunkerSource, Credential, FoundMarks, InitOptions, KeyInfo, PackGone, Repository, StoredBlob,
    DEFAULT_CHUNK_AVG, DEFAULT_PACK_SIZE, DEFAULT_ZSTD_LEVEL, FUTURE_SLACK_SECS, READ_GAP_BYTES,
    READ_RUN_BYTES,
};
