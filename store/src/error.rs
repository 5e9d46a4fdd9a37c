//! Errors of the repository layer.
//!
//! Policy: every fallible function in this crate returns [`StoreError`]. Variants carry the path
//! or id they concern, so a caller can tell a checksum mismatch from an I/O error and an operator
//! can tell which file is damaged. Decoders of on-disk bytes return [`DecodeError`] wrapped in
//! [`StoreError::Corrupt`]; they never panic on bad input.

use std::io;
use std::path::PathBuf;

use crate::id::{ChunkId, PackId};
use crate::kind::Kind;

/// Why bytes read from disk could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The structure ends before its fixed or announced length.
    #[error("truncated: needed {needed} bytes, {available} available")]
    Truncated {
        /// Bytes the decoder needed.
        needed: usize,
        /// Bytes that were there.
        available: usize,
    },
    /// The magic value at the start is not the one this structure carries.
    #[error("bad magic {found:02x?}")]
    BadMagic {
        /// What was found instead.
        found: Vec<u8>,
    },
    /// A format version this build does not read.
    #[error("unsupported format version {0}")]
    UnsupportedVersion(u32),
    /// The structure needs a feature this build does not implement (a required feature bit or
    /// extension written by a newer sbk).
    #[error("needs {0}, which this sbk does not support")]
    UnsupportedFeature(String),
    /// Sealed bytes do not authenticate: changed, truncated, or sealed for something else.
    #[error("authentication failed (the bytes were changed, or belong elsewhere)")]
    AuthenticationFailed,
    /// The stored checksum does not match the bytes.
    #[error("checksum mismatch: stored {expected}, computed {got}")]
    ChecksumMismatch {
        /// Checksum computed over the bytes, in hex.
        got: String,
        /// Checksum stored with them, in hex.
        expected: String,
    },
    /// A field holds a value outside its documented range.
    #[error("invalid {field}: {detail}")]
    Invalid {
        /// The field, as named in docs/format.md.
        field: &'static str,
        /// What is wrong with it.
        detail: String,
    },
}

/// Errors of the repository layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The path holds no sbk repository (no config file).
    #[error("{path}: not an sbk repository (no config file; create one with `sbk init`)")]
    NotARepository {
        /// The repository path given.
        path: PathBuf,
    },
    /// The object storage has no bucket of that name: nothing can be there yet.
    #[error("bucket {bucket} does not exist at {location}: create it (with Object Lock, to protect the backups from a stolen mover), or check the name and AWS_ENDPOINT_URL")]
    NoBucket {
        /// The bucket named.
        bucket: String,
        /// The repository location given.
        location: String,
    },
    /// `init --object-lock` on a bucket that was not created with Object Lock.
    #[error("{bucket}: the bucket has no Object Lock configuration, so it cannot hold a protected repository: create a bucket with Object Lock enabled (`aws s3api create-bucket --bucket NAME --object-lock-enabled-for-bucket`; an existing bucket cannot be switched on everywhere) and init there")]
    NoObjectLock {
        /// The repository location.
        bucket: String,
    },
    /// The repository needs storage that keeps object versions (Object Lock, `--as-of`), and
    /// this one does not.
    #[error("{location}: {what} needs S3 storage with object versions (Object Lock); {why}")]
    NoVersions {
        /// The repository location.
        location: String,
        /// What was asked for.
        what: String,
        /// Why it is not there, and what to do.
        why: String,
    },
    /// The config of a repository on storage that keeps versions was deleted or overwritten:
    /// what a stolen mover does. The versions before it are still there.
    #[error("{location}: the config {what}, but the storage still holds earlier versions of it ({versions}): see the repository as it was with `sbk --as-of TIME snapshots` (TIME before the damage, such as 2026-12-01T03:00:00Z or 2d), and rebuild it elsewhere with `sbk copy --from-repo {location} --from-as-of TIME`")]
    ConfigReplaced {
        /// The repository location.
        location: String,
        /// What happened to it.
        what: String,
        /// How many versions of the config the storage lists.
        versions: usize,
    },
    /// An object version the storage keeps under retention was to be deleted or changed.
    #[error("{kind} {name} is under retention until {until} (Object Lock): the storage refuses to delete or change it before then")]
    Retained {
        /// The object's kind.
        kind: Kind,
        /// Its name.
        name: String,
        /// Its retention date (RFC 3339, UTC).
        until: String,
    },
    /// A write to a repository opened read-only (`--as-of`: the repository as it was).
    #[error("{location}: read as of {as_of}, nothing is written (tried to write {kind} {name})")]
    ReadOnly {
        /// The repository location.
        location: String,
        /// The time it is read as of.
        as_of: String,
        /// What was to be written.
        kind: Kind,
        /// Its name.
        name: String,
    },
    /// `init` over something that is already there.
    #[error("{path}: refusing to initialise: {reason}")]
    InitRefused {
        /// The path given.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// An on-disk structure failed to decode.
    #[error("{path}: corrupt {what}: {source}")]
    Corrupt {
        /// The damaged file.
        path: PathBuf,
        /// What kind of structure it is (config, pack trailer, manifest…).
        what: &'static str,
        /// The decoding error.
        source: DecodeError,
    },
    /// A blob's contents do not hash to its id: the data is damaged.
    #[error("chunk {id} in pack {pack} is corrupt: {detail}")]
    BlobCorrupt {
        /// The blob's id.
        id: ChunkId,
        /// The pack holding it.
        pack: PackId,
        /// What failed (hash mismatch, decompression…).
        detail: String,
    },
    /// A blob the caller needs is not in the index.
    #[error(
        "chunk {0} is not in the index (missing data, or an index that needs `sbk repair index`)"
    )]
    BlobMissing(ChunkId),
    /// A pack the index refers to is not there.
    #[error("pack {pack} is missing ({path})")]
    PackMissing {
        /// The pack id.
        pack: PackId,
        /// Where it should be.
        path: PathBuf,
    },
    /// No snapshot matches the id or prefix given.
    #[error("no snapshot matches {0:?}")]
    SnapshotNotFound(String),
    /// Several snapshots match the prefix given.
    #[error("snapshot prefix {prefix:?} is ambiguous: it matches {count} snapshots")]
    AmbiguousSnapshot {
        /// The prefix given.
        prefix: String,
        /// How many snapshots it matches.
        count: usize,
    },
    /// Another process holds a conflicting lock.
    #[error("the repository is locked: {holder} ({path}); if that process is gone, `sbk unlock` removes stale locks")]
    Locked {
        /// The lock file.
        path: PathBuf,
        /// Who holds it.
        holder: String,
    },
    /// A repository object is not there.
    #[error("{kind} {name} is missing")]
    ObjectMissing {
        /// Its kind.
        kind: Kind,
        /// Its name.
        name: String,
    },
    /// A repository object is shorter than a read needed.
    #[error("{kind} {name} is truncated: {size} bytes, a read needed {needed}")]
    ShortObject {
        /// Its kind.
        kind: Kind,
        /// Its name.
        name: String,
        /// Bytes the read needed (offset plus length).
        needed: u64,
        /// Its size.
        size: u64,
    },
    /// The repository (or one of its objects) has a format this build does not read.
    #[error("{location}: {what} has format version {found}, which this sbk ({ours}) cannot read; it reads {supported}{hint}")]
    UnsupportedFormat {
        /// The repository.
        location: String,
        /// What carries the version (the repository config, a manifest…).
        what: &'static str,
        /// The version found.
        found: u32,
        /// The versions this build reads, as words ("formats 2 and 3").
        supported: &'static str,
        /// This build's version.
        ours: &'static str,
        /// Which sbk reads the version found, when known.
        hint: String,
    },
    /// The repository needs a feature this build does not implement.
    #[error("{location}: the repository needs {detail}; this sbk ({ours}) cannot use it (a newer sbk can)")]
    UnsupportedFeature {
        /// The repository.
        location: String,
        /// Which feature.
        detail: String,
        /// This build's version.
        ours: &'static str,
    },
    /// The lock this operation holds could not be kept (its refresh failed or it was removed),
    /// so the operation was stopped before the lock could expire under it.
    #[error(
        "the repository lock was lost: {0}; the operation was stopped so that nothing relies on it"
    )]
    LeaseLost(String),
    /// No key object opens with the password given.
    #[error("wrong password: no key of the repository opens with it ({tried} tried{})", if *damaged > 0 { format!(", {damaged} damaged key objects skipped") } else { String::new() })]
    WrongPassword {
        /// Key objects tried.
        tried: usize,
        /// Key objects that could not be read.
        damaged: usize,
    },
    /// A key file that cannot be used: unreadable, not private, not a key file, damaged.
    #[error("key file {path}: {what}")]
    KeyFile {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A key file that does not open this repository (another repository's, or revoked).
    #[error("the key file (key {key}) does not open the repository: {what}")]
    KeyFileRefused {
        /// Its key object's name.
        key: String,
        /// Why.
        what: String,
    },
    /// A password was given to a repository that only key files open.
    #[error("no password opens the repository: it holds no password key, only {key_files} key files (give one with --key-file)")]
    OnlyKeyFiles {
        /// Key-file key objects.
        key_files: usize,
    },
    /// The repository is encrypted and no password was available.
    #[error("no password: {0}; give one with SBK_PASSWORD, --password-file FILE or --password-command CMD, or run on a terminal to be asked")]
    NoPassword(String),
    /// A key operation on a repository that is not encrypted.
    #[error("the repository is not encrypted: it has no keys")]
    NotEncrypted,
    /// A key operation refused: one that would lock everyone out, pull the key from under
    /// itself, or write a key file over an existing file.
    #[error("refused: {0}")]
    KeyRefused(String),
    /// The index was used before it was loaded (a bug in the caller).
    #[error("the index was used before it was loaded")]
    IndexNotLoaded,
    /// Parameters given to `init` are out of range.
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
    /// The storage refused the credentials, or the permission to do something.
    #[error("{location}: the storage refused access: {detail}")]
    StorageDenied {
        /// The repository.
        location: String,
        /// What the storage said.
        detail: String,
    },
    /// The storage could not be reached, or kept failing, after bounded retries.
    #[error("{location}: the storage is unreachable or failing (after retries): {detail}")]
    StorageUnreachable {
        /// The repository.
        location: String,
        /// The last error.
        detail: String,
    },
    /// An operating-system error on a path.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

impl StoreError {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        StoreError::Io {
            path: path.into(),
            source,
        }
    }

    /// True when the error says stored bytes are damaged (as opposed to unreachable).
    pub fn is_corrupt(&self) -> bool {
        matches!(
            self,
            StoreError::Corrupt { .. }
                | StoreError::BlobCorrupt { .. }
                | StoreError::ShortObject { .. }
        )
    }

    /// True when the error is a full filesystem (ENOSPC or EDQUOT).
    pub fn is_no_space(&self) -> bool {
        matches!(self, StoreError::Io { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)))
    }
}

/// Result alias of this crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
