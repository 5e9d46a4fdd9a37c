//! What `sbk ls`, `sbk cat` and `sbk extract` share: a snapshot's disk opened for file-level
//! reads, with the repository's reads counted.

use std::sync::Arc;

use anyhow::Result;
use sbk_engine::{ServeShared, SnapshotFiles};
use sbk_nbd::server::Log;
use sbk_store::{Lock, LockKind, ReadCount};

use super::Context;

/// Bytes of verified chunks kept in memory while a filesystem is read (directories and
/// inode tables are read again and again; a file being copied passes through once).
const CACHE_BYTES: u64 = 64 << 20;

/// A snapshot's disk, open, and what keeps it so.
pub struct Opened {
    /// The disk.
    pub files: SnapshotFiles,
    /// The snapshot's full id.
    pub id: sbk_store::SnapshotId,
    /// Bytes and requests read from the repository so far.
    pub count: Arc<ReadCount>,
    shared: Arc<ServeShared>,
    _lock: Lock,
}

impl Drop for Opened {
    fn drop(&mut self) {
        self.shared.stop();
    }
}

/// Opens `snapshot` (an id, a prefix, `latest`) under a shared lock, as restore does.
pub fn open(ctx: &Context, snapshot: &str, purpose: &str) -> Result<Opened> {
    let (repo, lock, count) = ctx.open_counted(LockKind::Shared, purpose)?;
    let id = repo.resolve_snapshot(snapshot)?;
    // A read that fails is reported by the command, with the file it was for.
    let log: Log = Arc::new(|_: &str| {});
    // One prefetcher: a file being copied is read ahead while the previous piece is written.
    let shared = ServeShared::new(Arc::new(repo), CACHE_BYTES, 1, log);
    let files = SnapshotFiles::open(shared.clone(), id)?;
    Ok(Opened {
        files,
        id,
        count,
        shared,
        _lock: lock,
    })
}

/// A name from a filesystem as it can be printed: control characters become `?`.
pub fn printable(name: &[u8]) -> String {
    String::from_utf8_lossy(name)
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Runs a command that reads filesystems out of a snapshot, turning a panic inside a
/// filesystem reader (a hostile image that found a bug) into the error of a damaged
/// filesystem (exit 12) instead of an abort.
pub fn guarded(
    f: impl FnOnce() -> Result<std::process::ExitCode>,
) -> Result<std::process::ExitCode> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => {
            let why = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            Err(sbk_engine::EngineError::FilesystemDamaged {
                what: "the snapshot's filesystem".into(),
                why: format!("the filesystem reader failed on it ({why}); sbk serve or sbk restore give the raw disk"),
            }
            .into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::{classify, Exit};

    #[test]
    fn a_panic_in_a_reader_is_a_damaged_filesystem() {
        let e = guarded(|| panic!("index out of bounds")).unwrap_err();
        assert_eq!(classify(&e), Exit::Damaged);
        assert!(e.to_string().contains("index out of bounds"), "{e}");
        assert!(guarded(|| Ok(std::process::ExitCode::SUCCESS)).is_ok());
    }
}
