//! A backend that counts what is read through it: the bytes a command fetched from the
//! repository (`repository_bytes_read` in `--json`), so that "only what is needed is read" is
//! a figure, not a claim.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{Backend, Kind, ObjectInfo, Staged, Written};
use crate::error::Result;

/// Reads through a backend, counted.
#[derive(Debug, Default)]
pub struct ReadCount {
    bytes: AtomicU64,
    requests: AtomicU64,
}

impl ReadCount {
    /// Bytes read so far (whole objects and ranges).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
    /// Read requests so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
    fn add(&self, n: usize) {
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
}

/// `inner`, with its reads counted in a [`ReadCount`].
pub struct CountingBackend {
    inner: Arc<dyn Backend>,
    count: Arc<ReadCount>,
}

impl CountingBackend {
    /// Counts the reads of `inner`; the count is shared with the caller.
    pub fn new(inner: Arc<dyn Backend>) -> (CountingBackend, Arc<ReadCount>) {
        let count = Arc::new(ReadCount::default());
        (
            CountingBackend {
                inner,
                count: count.clone(),
            },
            count,
        )
    }
}

impl Backend for CountingBackend {
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
        let bytes = self.inner.read(kind, name)?;
        self.count.add(bytes.len());
        Ok(bytes)
    }
    fn read_at(&self, kind: Kind, name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read_at(kind, name, offset, buf)?;
        self.count.add(buf.len());
        Ok(())
    }
    fn size(&self, kind: Kind, name: &str) -> Result<u64> {
        self.inner.size(kind, name)
    }
    fn write_once(&self, kind: Kind, name: &str, bytes: &[u8]) -> Result<Written> {
        self.inner.write_once(kind, name, bytes)
    }
    fn stage(&self, kind: Kind, name: &str) -> Result<Box<dyn Staged>> {
        self.inner.stage(kind, name)
    }
    fn replace(&self, kind: Kind, name: &str, bytes: &[u8]) -> Result<()> {
        self.inner.replace(kind, name, bytes)
    }
    fn delete(&self, kind: Kind, name: &str) -> Result<()> {
        self.inner.delete(kind, name)
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
    use crate::backend::MemBackend;

    #[test]
    fn counts_whole_reads_and_ranges_not_writes() {
        let (b, count) = CountingBackend::new(Arc::new(MemBackend::new()));
        b.create().unwrap();
        b.write_once(Kind::Index, "a", &[7; 100]).unwrap();
        assert_eq!(count.bytes(), 0);
        assert_eq!(b.read(Kind::Index, "a").unwrap().len(), 100);
        let mut buf = [0u8; 30];
        b.read_at(Kind::Index, "a", 50, &mut buf).unwrap();
        assert_eq!((count.bytes(), count.requests()), (130, 2));
        assert!(b.read(Kind::Index, "missing").is_err());
        assert_eq!(count.requests(), 2, "a failed read fetched nothing");
    }
}
