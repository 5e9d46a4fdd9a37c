//! A backend wrapper that injects faults at an exact operation: the N-th write, replace or
//! delete fails, or the process dies right after it. Tests use it instead of killing a process
//! after a delay, so every crash point is hit on purpose and reproducibly.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{Backend, Kind, ObjectInfo, Staged, Written};
use crate::error::{Result, StoreError};

/// Test-only: `SBK_TEST_FAULT=fail:N` makes the N-th mutating operation fail with EIO;
/// `crash:N` ends the process (as a power cut or `kill -9` would) right after the N-th one
/// completes. Counted operations: object writes (each `write_once`, each staged object's
/// `finish`), `replace` and `delete`.
pub const FAULT_ENV: &str = "SBK_TEST_FAULT";

/// What happens at the chosen operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultMode {
    /// The operation fails with an I/O error; later ones fail too.
    Fail,
    /// The operation completes, then the process exits at once (no cleanup, no unwinding).
    Crash,
}

impl FaultMode {
    /// Parses `fail:N` or `crash:N`.
    pub fn parse(spec: &str) -> Option<(FaultMode, u64)> {
        let (mode, n) = spec.split_once(':')?;
        let mode = match mode {
            "fail" => FaultMode::Fail,
            "crash" => FaultMode::Crash,
            _ => return None,
        };
        Some((mode, n.parse().ok().filter(|n| *n > 0)?))
    }
}

/// Wraps a backend, counting mutating operations.
pub struct FaultyBackend {
    inner: Arc<dyn Backend>,
    mode: FaultMode,
    at: u64,
    count: Arc<AtomicU64>,
}

impl FaultyBackend {
    /// Faults `inner` at its `at`-th mutating operation (1-based).
    pub fn new(inner: Arc<dyn Backend>, mode: FaultMode, at: u64) -> Self {
        FaultyBackend {
            inner,
            mode,
            at,
            count: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Mutating operations counted so far (the failed ones included).
    pub fn operations(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Counts one mutating operation and runs it, or fails it.
    fn op<T>(&self, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        Self::counted(&self.count, self.mode, self.at, what, f)
    }

    fn counted<T>(
        count: &AtomicU64,
        mode: FaultMode,
        at: u64,
        what: &str,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let n = count.fetch_add(1, Ordering::SeqCst) + 1;
        if mode == FaultMode::Fail && n >= at {
            return Err(StoreError::io(
                format!("{what} (injected fault at operation {at})"),
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        let r = f();
        if mode == FaultMode::Crash && n == at {
            // An abort is what a crash looks like to the repository: nothing after this
            // operation happens, no destructor removes a temporary object or a lock.
            std::process::abort();
        }
        r
    }
}

struct FaultyStaged {
    inner: Box<dyn Staged>,
    count: Arc<AtomicU64>,
    mode: FaultMode,
    at: u64,
}

impl Staged for FaultyStaged {
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.inner.write(bytes)
    }
    fn finish(self: Box<Self>) -> Result<()> {
        let FaultyStaged {
            inner,
            count,
            mode,
            at,
        } = *self;
        FaultyBackend::counted(&count, mode, at, "finishing a staged object", || {
            inner.finish()
        })
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
}

impl Backend for FaultyBackend {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn create(&self) -> Result<()> {
        self.inner.create()
    }
    fn list(&self, kind: Kind) -> Result<Vec<ObjectInfo>> {
        self.inner.list(kind)
    }
    fn list_names(&self, kind: Kind) -> Result<Vec<String>> {
        self.inner.list_names(kind)
    }
    fn read(&self, kind: Kind, name: &str) -> Result<Vec<u8>> {
        self.inner.read(kind, name)
    }
    fn read_at(&self, kind: Kind, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read_at(kind, name, offset, buf)
    }
    fn size(&self, kind: Kind, name: &str) -> Result<u64> {
        self.inner.size(kind, name)
    }
    fn write_once(&self, kind: Kind, name: &str, bytes: &[u8]) -> Result<Written> {
        self.op(&format!("writing {kind} {name}"), || {
            self.inner.write_once(kind, name, bytes)
        })
    }
    fn stage(&self, kind: Kind, name: &str) -> Result<Box<dyn Staged>> {
        Ok(Box::new(FaultyStaged {
            inner: self.inner.stage(kind, name)?,
            count: self.count.clone(),
            mode: self.mode,
            at: self.at,
        }))
    }
    fn replace(&self, kind: Kind, name: &str, bytes: &[u8]) -> Result<()> {
        self.op(&format!("replacing {kind} {name}"), || {
            self.inner.replace(kind, name, bytes)
        })
    }
    fn delete(&self, kind: Kind, name: &str) -> Result<()> {
        self.op(&format!("deleting {kind} {name}"), || {
            self.inner.delete(kind, name)
        })
    }
    fn remove_leftovers(&self, before: i64) -> Result<u64> {
        self.inner.remove_leftovers(before)
    }
    fn reads_are_requests(&self) -> bool {
        self.inner.reads_are_requests()
    }
    fn will_read(&self, kind: Kind, name: &str) {
        self.inner.will_read(kind, name)
    }
    fn versions(&self) -> Option<&dyn super::Versions> {
        self.inner.versions()
    }
    fn read_only(&self) -> Option<String> {
        self.inner.read_only()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::LocalBackend;

    #[test]
    fn the_nth_mutation_fails_and_so_do_later_ones() {
        let dir = tempfile::tempdir().unwrap();
        let local = Arc::new(LocalBackend::new(&dir.path().join("r")));
        local.create().unwrap();
        let b = FaultyBackend::new(local, FaultMode::Fail, 3);
        b.write_once(Kind::Index, "a", b"1").unwrap();
        b.write_once(Kind::Index, "b", b"2").unwrap();
        assert!(b.delete(Kind::Index, "a").is_err());
        assert!(b.write_once(Kind::Index, "c", b"3").is_err());
        assert_eq!(b.list(Kind::Index).unwrap().len(), 2, "reads still work");
        assert_eq!(FaultMode::parse("crash:7"), Some((FaultMode::Crash, 7)));
        assert_eq!(FaultMode::parse("crash:0"), None);
        assert_eq!(FaultMode::parse("boom:1"), None);
    }
}
