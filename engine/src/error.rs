//! Errors of the engine.
//!
//! Policy: [`EngineError`] wraps the store's typed errors unchanged and adds the engine's own,
//! each naming the source or target path (and the offset, for read errors) it concerns.

use std::io;
use std::path::PathBuf;

use sbk_store::StoreError;

/// Errors of backup and restore.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The repository failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The source is not something sbk backs up (a directory, a character device…).
    #[error("{path}: cannot back up: {reason}")]
    SourceUnusable {
        /// The source path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The source could not be opened or inspected.
    #[error("{path}: {source}")]
    SourceOpen {
        /// The source path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Reading the source failed.
    #[error("{path}: read error at offset {offset}: {source}")]
    SourceRead {
        /// The source path.
        path: PathBuf,
        /// Where the read started.
        offset: u64,
        /// The OS error.
        source: io::Error,
    },
    /// The source changed size while it was read (an image being written to, a device that
    /// went away): what was read is not one consistent disk, so no snapshot is written.
    #[error("{path}: the source changed size while it was read (from {expected} to {found} bytes); no snapshot was written: back up a snapshot of it, or stop what is writing to it")]
    SourceResized {
        /// The source path.
        path: PathBuf,
        /// Size at the start of the backup.
        expected: u64,
        /// The size found later (or where a read found it ending).
        found: u64,
    },
    /// A stream's command failed: what it wrote may be cut short, so it is not a whole disk.
    #[error("{path}: the command failed ({status}): what it wrote may not be the whole disk; no snapshot was written")]
    SourceIncomplete {
        /// The source (the command).
        path: PathBuf,
        /// How the command ended.
        status: String,
    },
    /// The parent of an incremental backup cannot be used (another segment size, no snapshot
    /// carrying the token the list starts from).
    #[error("cannot back up incrementally: {0}")]
    ParentUnusable(String),
    /// A snapshot named to forget is still protected (Object Lock).
    #[error("snapshot {id} is protected until {until} (the repository is under Object Lock): it cannot be forgotten before then, by anyone")]
    Protected {
        /// The snapshot (short id).
        id: String,
        /// When its protection ends (RFC 3339, UTC).
        until: String,
    },
    /// A retention policy would keep no snapshot of a host and source.
    #[error("the policy keeps no snapshot of host {host:?}, source {source_name:?}; to remove them all, name them")]
    PolicyKeepsNone {
        /// The host.
        host: String,
        /// The source.
        source_name: String,
    },
    /// The operator asked the process to stop (SIGINT, SIGTERM); nothing was left half-done.
    #[error("interrupted: stopped at the operator's request, before anything was left half-done")]
    Interrupted,
    /// An operation refused to go on because it could lose data (prune over a damaged
    /// repository, say).
    #[error("refusing to continue: {0}")]
    Unsafe(String),
    /// A pack or index write of this run failed before: the thread that noticed first was
    /// handed the cause; nothing of this run may rely on what it wrote.
    #[error("refusing to continue: an earlier pack or index write of this run failed; no snapshot can rely on it")]
    EarlierWriteFailed,
    /// The worker thread pool could not be started.
    #[error("cannot start worker threads: {0}")]
    ThreadPool(#[from] rayon::ThreadPoolBuildError),
    /// A thread of the pipeline could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(#[source] io::Error),
    /// The repository's chunker parameters are out of range.
    #[error("repository chunker parameters: {0}")]
    ChunkerParams(#[from] sbk_chunker::ParamsError),
    /// The restore target exists and holds data.
    #[error("{path}: target exists and is not empty (use --force to overwrite it)")]
    TargetExists {
        /// The target path.
        path: PathBuf,
    },
    /// The restore target device is smaller than the snapshot.
    #[error("{path}: target holds {size} bytes, the snapshot needs {needed}")]
    TargetTooSmall {
        /// The target path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The snapshot's size.
        needed: u64,
    },
    /// The restore target is not a file or block device.
    #[error("{path}: cannot restore to it: {reason}")]
    TargetUnusable {
        /// The target path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A path in a snapshot's filesystem names nothing (or goes through a file), or a
    /// partition the disk does not have.
    #[error("{path}: {why}")]
    NoSuchFile {
        /// The path (or `PART:`).
        path: String,
        /// Why.
        why: String,
    },
    /// A snapshot's disk or partition holds nothing sbk can read files from.
    #[error("{what}: {why}")]
    FilesystemUnreadable {
        /// The disk or partition.
        what: String,
        /// What is there instead, and what to use.
        why: String,
    },
    /// A filesystem in a snapshot is damaged where it was read (or a chunk of it is).
    #[error("{what}: {why}")]
    FilesystemDamaged {
        /// The disk, partition or path.
        what: String,
        /// What was found.
        why: String,
    },
    /// Writing the restore target failed.
    #[error("{path}: {source}")]
    Target {
        /// The target path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

impl EngineError {
    /// True when the error is a full filesystem in the repository or the target.
    pub fn is_no_space(&self) -> bool {
        match self {
            EngineError::Store(e) => e.is_no_space(),
            EngineError::Target { source, .. } => matches!(
                source.raw_os_error(),
                Some(libc::ENOSPC) | Some(libc::EDQUOT)
            ),
            _ => false,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
