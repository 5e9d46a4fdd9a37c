//! Exit codes, as documented in the README ("Exit codes"). Scripts rely on them: never reuse a
//! number for another meaning.

use std::process::ExitCode;

use sbk_engine::EngineError;
use sbk_store::StoreError;

/// The documented exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Success.
    Ok = 0,
    /// An error not covered below (I/O, an unreadable source…).
    Error = 1,
    /// Bad arguments (clap exits with 2 itself).
    Usage = 2,
    /// A backup of several sources where some failed and some succeeded.
    Partial = 3,
    /// No repository at the path given (or none given).
    NoRepository = 10,
    /// The snapshot id is unknown or the prefix ambiguous.
    NoSnapshot = 11,
    /// The repository is damaged: a corrupt config, pack, manifest or chunk.
    Damaged = 12,
    /// Refused to act: the target exists, is too small, or init over a non-empty directory.
    Refused = 13,
    /// The filesystem holding the repository or target is full.
    NoSpace = 14,
    /// Another process holds a conflicting lock on the repository, or the lock this command
    /// held was lost while it ran.
    Locked = 15,
    /// The repository (or one of its objects) has a format this sbk cannot read, older or
    /// newer, or needs a feature it does not implement.
    Format = 16,
    /// The storage refused the credentials or a permission.
    Denied = 17,
    /// The storage could not be reached, or kept failing, after bounded retries.
    Unreachable = 18,
    /// A wrong password (no key of the repository opens with it), or none given; a key file
    /// that cannot be used (readable by others, damaged, another repository's, or revoked).
    WrongPassword = 19,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        ExitCode::from(e as u8)
    }
}

/// The exit code for an error: the first typed error in its chain decides.
pub fn classify(e: &anyhow::Error) -> Exit {
    for cause in e.chain() {
        if let Some(s) = cause.downcast_ref::<StoreError>() {
            return store_exit(s);
        }
        if let Some(en) = cause.downcast_ref::<EngineError>() {
            return engine_exit(en);
        }
        if let Some(exit) = cause.downcast_ref::<ExitWith>() {
            return exit.0;
        }
    }
    Exit::Error
}

/// An error that carries its exit code (for errors the CLI raises itself).
#[derive(Debug, thiserror::Error)]
#[error("{1}")]
pub struct ExitWith(pub Exit, pub String);

/// The exit code for a store error.
pub fn store_exit(e: &StoreError) -> Exit {
    if e.is_no_space() {
        return Exit::NoSpace;
    }
    match e {
        StoreError::Corrupt {
            source:
                sbk_store::DecodeError::UnsupportedVersion(_)
                | sbk_store::DecodeError::UnsupportedFeature(_),
            ..
        }
        | StoreError::UnsupportedFormat { .. }
        | StoreError::UnsupportedFeature { .. } => Exit::Format,
        StoreError::NotARepository { .. } | StoreError::NoBucket { .. } => Exit::NoRepository,
        StoreError::SnapshotNotFound(_) | StoreError::AmbiguousSnapshot { .. } => Exit::NoSnapshot,
        StoreError::Corrupt { .. }
        | StoreError::BlobCorrupt { .. }
        | StoreError::BlobMissing(_)
        | StoreError::PackMissing { .. }
        | StoreError::ObjectMissing { .. }
        | StoreError::ShortObject { .. }
        | StoreError::ConfigReplaced { .. } => Exit::Damaged,
        StoreError::InitRefused { .. }
        | StoreError::KeyRefused(_)
        | StoreError::NotEncrypted
        | StoreError::NoObjectLock { .. }
        | StoreError::NoVersions { .. }
        | StoreError::Retained { .. }
        | StoreError::ReadOnly { .. } => Exit::Refused,
        StoreError::WrongPassword { .. }
        | StoreError::NoPassword(_)
        | StoreError::KeyFile { .. }
        | StoreError::KeyFileRefused { .. }
        | StoreError::OnlyKeyFiles { .. } => Exit::WrongPassword,
        StoreError::Locked { .. } | StoreError::LeaseLost(_) => Exit::Locked,
        StoreError::InvalidParameter(_) => Exit::Usage,
        StoreError::StorageDenied { .. } => Exit::Denied,
        StoreError::StorageUnreachable { .. } => Exit::Unreachable,
        _ => Exit::Error,
    }
}

/// The exit code for an engine error.
pub fn engine_exit(e: &EngineError) -> Exit {
    if e.is_no_space() {
        return Exit::NoSpace;
    }
    match e {
        EngineError::Store(s) => store_exit(s),
        EngineError::Unsafe(_)
        | EngineError::EarlierWriteFailed
        | EngineError::FilesystemDamaged { .. } => Exit::Damaged,
        EngineError::NoSuchFile { .. } => Exit::NoSnapshot,
        EngineError::TargetExists { .. }
        | EngineError::ParentUnusable(_)
        | EngineError::PolicyKeepsNone { .. }
        | EngineError::Protected { .. }
        | EngineError::TargetTooSmall { .. }
        | EngineError::TargetUnusable { .. }
        | EngineError::FilesystemUnreadable { .. } => Exit::Refused,
        _ => Exit::Error,
    }
}
